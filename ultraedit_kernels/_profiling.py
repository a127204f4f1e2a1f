"""Named ranges around the editor's stages, free when nobody is profiling.

``nvtx_range(name)`` is a context manager and a decorator::

    with nvtx_range("ultraedit/solve"):
        ...

    @nvtx_range("ultraedit/apply")
    def apply(...): ...

What it does on entry:

* pushes an NVTX range (seen by Nsight Systems / Nsight Compute) when CUDA is available **and**
  ``ULTRAEDIT_NVTX=1`` is set in the environment;
* opens a ``torch.profiler.record_function`` range when a ``torch.profiler`` (or
  ``torch.autograd.profiler``) session is active, so the stage shows up as a named block in the
  Chrome trace, on CPU and GPU alike;
* otherwise nothing: one cached boolean test and one C call (``torch.autograd._profiler_enabled``);
  no CUDA initialization, no import of ``torch.cuda.nvtx`` on CPU builds of torch.

The NVTX decision is read once (lazily) and cached; ``refresh()`` re-reads the environment
(tests, or a process that sets ``ULTRAEDIT_NVTX`` after importing).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

ENV_VAR = "ULTRAEDIT_NVTX"

_nvtx_state: Optional[bool] = None   # None: not decided yet
_nvtx_module = None


def _decide_nvtx() -> bool:
    global _nvtx_state, _nvtx_module
    enabled = os.environ.get(ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")
    if enabled:
        try:
            # is_available() queries the driver only; it does not create a CUDA context.
            enabled = bool(torch.cuda.is_available())
        except Exception:  # broken driver installs: never break the editor for profiling
            enabled = False
    if enabled:
        try:
            import torch.cuda.nvtx as nvtx
            _nvtx_module = nvtx
        except Exception:
            enabled = False
    _nvtx_state = enabled
    return enabled


def nvtx_enabled() -> bool:
    """Whether ``nvtx_range`` pushes NVTX ranges in this process (cached)."""
    return _decide_nvtx() if _nvtx_state is None else _nvtx_state


def refresh() -> bool:
    """Re-read ``ULTRAEDIT_NVTX`` (and CUDA availability); returns the new decision."""
    global _nvtx_state
    _nvtx_state = None
    return nvtx_enabled()


def _profiler_active() -> bool:
    try:
        return bool(torch.autograd._profiler_enabled())
    except Exception:  # pragma: no cover - private API moved
        return False


class nvtx_range(contextlib.ContextDecorator):
    """Context manager / decorator marking a named stage for NVTX and ``torch.profiler``.

    A no-op unless profiling (see the module docstring). Re-entrant: every ``with`` and every
    decorated call gets its own state, so nesting, recursion and threads are safe.
    """

    __slots__ = ("name", "_pushed", "_record")

    def __init__(self, name: str):
        self.name = str(name)
        self._pushed = False
        self._record = None

    def _recreate_cm(self):  # a fresh instance per decorated call
        return type(self)(self.name)

    def __enter__(self):
        if _nvtx_state if _nvtx_state is not None else _decide_nvtx():
            _nvtx_module.range_push(self.name)
            self._pushed = True
        if _profiler_active():
            self._record = torch.profiler.record_function(self.name)
            self._record.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._record is not None:
            self._record.__exit__(exc_type, exc, tb)
            self._record = None
        if self._pushed:
            _nvtx_module.range_pop()
            self._pushed = False
        return False


__all__ = ["ENV_VAR", "nvtx_enabled", "nvtx_range", "refresh"]

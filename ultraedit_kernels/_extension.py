"""Guarded loading of the compiled extension ``ultraedit_kernels._C``.

The package never fails to import because the extension is missing or broken: the
failure is recorded, logged once when something first asks for the extension, and turned
into an actionable error only when a caller explicitly needs it (``ULTRAEDIT_BACKEND=cpp``
or ``cuda``).  Loading the extension does not initialize CUDA.
"""
from __future__ import annotations

import logging
from typing import Optional

_log = logging.getLogger("ultraedit_kernels")

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the repository, with a torch "
    "of 2.11-2.13 installed first (the host part needs a C++ compiler; the CUDA part needs nvcc and "
    "a CUDA build of torch; ULTRAEDIT_SKIP_NATIVE_BUILD=1 disables both)")

_module = None
_error: Optional[str] = None
_tried = False
_warned = False


def _load() -> None:
    global _module, _error, _tried
    if _tried:
        return
    _tried = True
    try:
        from ultraedit_kernels import _C  # noqa: F401  (registers torch.ops.ultraedit_C.*)
        _module = _C
    except Exception as err:  # ImportError, OSError (undefined symbol), ...
        _error = f"{type(err).__name__}: {err}"


def extension():
    """The loaded extension module, or ``None``."""
    _load()
    return _module


def load_error() -> Optional[str]:
    """Why the extension is not loaded (``None`` when it is)."""
    _load()
    return _error


def has_cpu_kernels() -> bool:
    mod = extension()
    return bool(mod is not None and getattr(mod, "has_cpu", lambda: True)())


def has_cuda_kernels() -> bool:
    mod = extension()
    return bool(mod is not None and getattr(mod, "has_cuda", lambda: False)())


def unavailable_reason(part: str) -> Optional[str]:
    """``None`` if the ``part`` ("cpu" or "cuda") of the extension is loaded, else why not.

    Logs the load failure once per process the first time it is asked.
    """
    global _warned
    mod = extension()
    if mod is None:
        if not _warned:
            _warned = True
            _log.warning("ultraedit_kernels._C is not available (%s); %s", _error, BUILD_HINT)
        return f"the compiled extension ultraedit_kernels._C is not loaded ({_error}); {BUILD_HINT}"
    if part == "cuda" and not has_cuda_kernels():
        return ("ultraedit_kernels._C was built without its CUDA part (no nvcc or a CPU build "
                f"of torch at build time); {BUILD_HINT}")
    if part == "cpu" and not has_cpu_kernels():
        return f"ultraedit_kernels._C was built without its host part; {BUILD_HINT}"
    return None


_fakes_registered = set()


def native_op_ready(part: str, op: str, fake) -> Optional[str]:
    """``None`` when the ``part`` ("cpu" / "cuda") of the extension is loaded and defines
    ``torch.ops.ultraedit_C.<op>``, else why not. Registers ``fake`` as the op's fake (meta)
    implementation the first time it is ready."""
    why = unavailable_reason(part)
    if why is not None:
        return why
    import torch

    if not hasattr(torch.ops.ultraedit_C, op):
        return (f"the loaded ultraedit_kernels._C predates its {op} kernel; rebuild it: "
                f"{BUILD_HINT}")
    if op not in _fakes_registered:
        _fakes_registered.add(op)
        try:
            torch.library.register_fake(f"ultraedit_C::{op}")(fake)
        except Exception as err:  # a fake registered elsewhere already, or an old torch
            _log.debug("register_fake(ultraedit_C::%s) skipped: %s", op, err)
    return None

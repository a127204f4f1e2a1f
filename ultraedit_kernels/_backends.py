"""Backend registry and selection.

Every op keeps its implementations in its own file and registers them here with
:func:`register_impl`.  :func:`select` picks one per call from the environment variable
``ULTRAEDIT_BACKEND`` (read at call time, so it can change inside a process):

``auto`` (default)
    the fastest available implementation for the op and the tensors' device; never fails.
``torch``
    the pure-PyTorch reference everywhere.
``triton`` / ``cuda`` / ``cpp``
    that backend for every op it implements, the reference for the others; an error that
    says why and how to get it when the backend is not available for the device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")
ENV_VAR = "ULTRAEDIT_BACKEND"


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    ``available(device)`` returns ``None`` when the implementation can run on ``device``
    (a ``torch.device``), or a sentence saying why not and how to fix it.
    ``auto_priority`` orders the candidates of ``auto`` (higher first); a negative
    priority keeps the implementation out of ``auto`` entirely.
    ``auto_ok(*args)`` may veto ``auto`` for a particular call (e.g. shapes where it is slower).
    """

    backend: str
    fn: Callable
    available: Callable[[torch.device], Optional[str]]
    auto_priority: int = 0
    auto_ok: Optional[Callable[..., bool]] = None


_REGISTRY: Dict[str, Dict[str, Impl]] = {}


def _always(_device: torch.device) -> Optional[str]:
    return None


def register_impl(op: str, backend: str, fn: Callable, *, available=_always,
                  auto_priority: int = 0, auto_ok=None) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op`` (replaces a previous one)."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS[1:]}")
    _REGISTRY.setdefault(op, {})[backend] = Impl(backend, fn, available, auto_priority, auto_ok)


def registered_ops() -> List[str]:
    return sorted(_REGISTRY)


def implementations(op: str) -> Dict[str, Impl]:
    return dict(_REGISTRY[op])


def requested_backend() -> str:
    """The backend named by ``ULTRAEDIT_BACKEND`` (``auto`` when unset); validated."""
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(
            f"{ENV_VAR}={name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return name


def backend_status(backend: str, device: torch.device) -> Optional[str]:
    """``None`` when ``backend`` can run at least one op on ``device``, else why not."""
    reasons = []
    for impls in _REGISTRY.values():
        impl = impls.get(backend)
        if impl is None:
            continue
        why = impl.available(device)
        if why is None:
            return None
        reasons.append(why)
    if not reasons:
        return f"no op has a {backend!r} implementation"
    return reasons[0]


def select(op: str, device: torch.device, *args) -> Tuple[str, Callable]:
    """Return ``(backend_name, fn)`` for ``op`` on ``device`` under the requested backend."""
    impls = _REGISTRY[op]
    name = requested_backend()
    if name == "torch":
        return "torch", impls["torch"].fn
    if name != "auto":
        why = backend_status(name, device)
        if why is not None:
            raise RuntimeError(
                f"{ENV_VAR}={name} was requested but the {name!r} backend is not available "
                f"on {device.type}: {why}")
        impl = impls.get(name)
        if impl is None or impl.available(device) is not None:
            # The backend exists but does not implement this op (or not on this device):
            # the reference computes it.
            return "torch", impls["torch"].fn
        return name, impl.fn
    candidates = sorted(
        (i for i in impls.values() if i.auto_priority >= 0 and i.backend != "torch"),
        key=lambda i: -i.auto_priority)
    for impl in candidates:
        if impl.available(device) is None and (impl.auto_ok is None or impl.auto_ok(*args)):
            return impl.backend, impl.fn
    return "torch", impls["torch"].fn


def dispatch_table(device: torch.device) -> Dict[str, str]:
    """Which backend each op dispatches to on ``device`` right now.

    Under ``auto``, an implementation that is only chosen for some shapes (it has an
    ``auto_ok`` veto) is shown as ``"<backend> by shape, else <fallback>"``.
    """
    table = {}
    for op in registered_ops():
        try:
            if requested_backend() != "auto":
                table[op] = select(op, device)[0]
                continue
            ranked = sorted((i for i in _REGISTRY[op].values()
                             if i.auto_priority >= 0 and i.backend != "torch"
                             and i.available(device) is None), key=lambda i: -i.auto_priority)
            shaped = []
            for impl in ranked:
                if impl.auto_ok is None:
                    break
                shaped.append(impl.backend)
            else:
                impl = None
            chosen = impl.backend if impl is not None else "torch"
            table[op] = (f"{' / '.join(shaped)} by shape, else {chosen}" if shaped else chosen)
        except (RuntimeError, ValueError) as err:
            table[op] = f"error: {err}"
    return table

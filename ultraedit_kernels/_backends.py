"""Backend registry and selection.

Every op keeps its implementations in its own file and registers them here with
:func:`register_impl`.  :func:`select` picks one per call from the environment variable
``ULTRAEDIT_BACKEND`` (read at call time, so it can change inside a process):

``auto`` (default)
    the implementation measured fastest for the op, the tensors' device and the call's shape
    class on this machine (:mod:`.calibration`), the PyTorch reference wherever no native
    implementation measured faster; never fails.
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


class _EnvironView:
    """``get(name)``: ``os.environ.get(name)`` (where ``os.environ`` keeps no ``_data`` dict)."""

    @staticmethod
    def get(name):
        return os.environ.get(name)


def environ_mapping(*names: str):
    """``(mapping, key_1, ..., key_n)`` such that ``mapping.get(key_i)`` is the current raw value
    of the environment variable ``names[i]`` (or ``None``), for use as a cache key on every
    call: ``os.environ``'s own dict, which every write through ``os.environ`` (and
    ``monkeypatch.setenv``) updates, and the encoded names (a lookup there costs ~0.05 µs;
    ``os.environ.get`` of an unset variable ~1.7 µs: it raises and catches a KeyError inside);
    where ``os.environ`` has no such dict, a view that calls ``os.environ.get`` and the names."""
    data = getattr(os.environ, "_data", None)
    encode = getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and callable(encode):
        return (data,) + tuple(encode(n) for n in names)
    return (_EnvironView,) + names


def env_reader(name: str) -> Callable[[], object]:
    """A function returning the current raw value of the environment variable ``name`` (or
    ``None``) through :func:`environ_mapping`."""
    mapping, key = environ_mapping(name)
    return lambda: mapping.get(key)


_backend_env = env_reader(ENV_VAR)


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    ``available(device)`` returns ``None`` when the implementation can run on ``device``
    (a ``torch.device``), or a sentence saying why not and how to fix it.
    A negative ``auto_priority`` keeps the implementation out of ``auto`` entirely; otherwise
    ``auto`` considers it when ``auto_ok(*args)`` (if given) accepts the call (hard limits such
    as dtypes or the Triton interpreter) and uses it where the calibration measured it faster.
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
    _SELECTED.clear()


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


def _select_slow(op: str, impls: Dict[str, Impl], name: str, device: torch.device):
    """What :func:`select` decides without the call's arguments: ``(name, fn)`` when that is
    final, or ``(None, candidates)`` (the names of the native implementations ``auto``
    considers, looked up in the registry at each call: an implementation registered since,
    e.g. a Triton launcher replacing its stand-in, is the one used)."""
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
        return name, impls[name].fn   # (re-read: the availability check may have registered it)
    candidates = tuple(i.backend for i in list(impls.values())
                       if i.backend != "torch" and i.auto_priority >= 0
                       and i.available(device) is None)
    if not candidates:
        return "torch", impls["torch"].fn
    return None, candidates


# (op, device, raw ULTRAEDIT_BACKEND value) -> (the op's registry dict, name or None, fn or
# candidates): the part of a selection that does not depend on the call's shapes.  An
# implementation's availability does not change within a process (Triton's interpreter mode,
# the extension's load and a device's capability are fixed once read); register_impl clears it,
# and an entry made for another registry dict (a test replacing an op's dict) is not used.
_SELECTED: Dict[tuple, tuple] = {}


def select(op: str, device: torch.device, *args) -> Tuple[str, Callable]:
    """Return ``(backend_name, fn)`` for ``op`` on ``device`` under the requested backend.

    The environment variable is read on every call (a dict lookup); what follows from its value,
    the op and the device is memoized, and ``auto``'s shape-dependent choice is memoized by the
    calibration (:func:`.calibration.choose`), so a call costs about a microsecond.
    """
    impls = _REGISTRY[op]
    key = (op, device, _backend_env())
    hit = _SELECTED.get(key)
    if hit is None or hit[0] is not impls:
        name = requested_backend()
        hit = (impls,) + _select_slow(op, impls, name, device)
        if len(_SELECTED) > 1024:
            _SELECTED.clear()
        _SELECTED[key] = hit
    if hit[1] is not None:
        return hit[1], hit[2]
    candidates = tuple(b for b in hit[2]
                       if impls[b].auto_ok is None or impls[b].auto_ok(*args))
    if not candidates:
        return "torch", impls["torch"].fn
    global _calibration
    if _calibration is None:   # imported here: importing the package never calibrates
        from . import calibration as _calibration
    chosen = _calibration.choose(op, device, candidates, args)
    return chosen, impls[chosen].fn


_calibration = None


def dispatch_table(device: torch.device) -> Dict[str, str]:
    """Which backend each op dispatches to on ``device`` right now (never calibrates).

    Under ``auto``, an op with native implementations available is shown as
    ``"<backends> where calibrated faster, else torch"``.
    """
    table = {}
    for op in registered_ops():
        try:
            if requested_backend() != "auto":
                table[op] = select(op, device)[0]
                continue
            native = [i.backend for i in _REGISTRY[op].values()
                      if i.backend != "torch" and i.auto_priority >= 0
                      and i.available(device) is None]
            table[op] = (f"{' / '.join(native)} where calibrated faster, else torch"
                         if native else "torch")
        except (RuntimeError, ValueError) as err:
            table[op] = f"error: {err}"
    return table


def eager(op, body: Callable) -> Callable:
    """A caller of ``op`` (a ``torch.library`` custom op) that skips its dispatcher in eager mode.

    The custom op costs ~20 µs per call on top of its body (measured on the 2-core CPU machine),
    which the small ops of a turn pay several times; in eager mode the returned function calls
    ``body`` (the op's backend selection and kernel) directly, and while ``torch.compile`` traces
    it calls ``op`` so the graph sees the registered op and its fake.

    The ops are not differentiable (no autograd formula is registered; the native kernels have
    none): the body runs without grad, so the result never requires grad whichever backend
    computes it, and a grad-requiring input (a running statistic fed an activation that is part
    of a graph) never chains the graph into the op's outputs.
    """
    def call(*args):
        run = op if torch.compiler.is_compiling() else body
        if torch.is_grad_enabled():   # traced too: the compiled result does not require grad
            with torch.no_grad():
                return run(*args)
        return run(*args)
    call.__name__ = getattr(body, "__name__", "call")
    call.__doc__ = body.__doc__
    return call

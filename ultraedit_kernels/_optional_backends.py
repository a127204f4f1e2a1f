"""Registration of the optional Triton backend, imported on first need.

The op files never import Triton. Here each Triton op gets a stand-in implementation that says
where the kernels can run without importing anything (CUDA devices; the CPU only under
``TRITON_INTERPRET=1``), and imports its module the first time a call, an availability check
for such a device or :func:`load_all` needs it: the module then registers its real launcher
(replacing the stand-in). So a process that only computes on the CPU never imports Triton
(about 0.17 s and its memory), and a missing or broken Triton only leaves the ops without this
backend. Nothing here touches CUDA.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Dict, Optional

_log = logging.getLogger("ultraedit_kernels")

# module -> the ops it registers a "triton" implementation of
OPTIONAL_MODULES = {"_triton.pseudo_values": ("pseudo_values",),
                    "_triton.stats_update": ("stats_update", "stats_update2"),
                    "_triton.gram": ("gram",)}
IMPORT_ERRORS: Dict[str, str] = {}   # module -> why it could not be imported
_LOADED: set = set()
NOT_ON_THIS_DEVICE_CPU = ("Triton kernels run on CUDA devices; on the CPU only through the "
                          "interpreter (export TRITON_INTERPRET=1 before Python starts)")


def not_on_this_device(device_type: str) -> str:
    """Why Triton kernels do not run on a ``device_type`` that is neither CPU nor CUDA."""
    return f"no Triton kernels for {device_type} devices"


def load(module: str) -> Optional[str]:
    """Import ``module`` once (it registers its launchers); ``None``, or why it failed."""
    if module not in _LOADED:
        _LOADED.add(module)
        try:
            importlib.import_module(f"ultraedit_kernels.{module}")
        except Exception as err:  # never break a call: the op keeps its other backends
            IMPORT_ERRORS[module] = f"{type(err).__name__}: {err}"
            _log.debug("optional backend module %s not registered: %s", module, err)
    return IMPORT_ERRORS.get(module)


def load_all() -> Dict[str, str]:
    """Import every optional module now (``python -m ultraedit_kernels.info``, the AOT build);
    returns the import errors."""
    for module in OPTIONAL_MODULES:
        load(module)
    return dict(IMPORT_ERRORS)


def _interpreting() -> bool:
    # triton reads the variable when it is imported; the process's value is the one that counts
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _stand_in(module: str, op: str):
    from . import _backends

    def real():
        """The module's registered implementation (after importing it), or None."""
        if load(module) is not None:
            return None
        impl = _backends._REGISTRY[op].get("triton")
        return None if impl is None or impl.fn is call else impl

    def available(device) -> Optional[str]:
        if device.type == "cpu" and not _interpreting():
            return NOT_ON_THIS_DEVICE_CPU
        if device.type not in ("cpu", "cuda"):
            return not_on_this_device(device.type)
        impl = real()
        if impl is None:
            return f"the Triton kernels could not be imported ({IMPORT_ERRORS.get(module)})"
        return impl.available(device)

    def auto_ok(*args) -> bool:
        impl = real()
        return impl is not None and (impl.auto_ok is None or impl.auto_ok(*args))

    def call(*args):
        impl = real()
        if impl is None:
            raise RuntimeError(f"the Triton kernels could not be imported "
                               f"({IMPORT_ERRORS.get(module)})")
        return impl.fn(*args)

    return call, available, auto_ok


def _register_stand_ins() -> None:
    from . import _backends

    for module, ops in OPTIONAL_MODULES.items():
        for op in ops:
            fn, available, auto_ok = _stand_in(module, op)
            _backends.register_impl(op, "triton", fn, available=available, auto_priority=10,
                                    auto_ok=auto_ok)


_register_stand_ins()

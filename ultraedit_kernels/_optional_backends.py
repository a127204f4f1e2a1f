"""Registration of the optional backends (Triton kernels, the compiled extension).

Kept apart from the op files, which never import Triton: each optional module registers its
implementations when the package imports it here, and a failed import only leaves the op
with fewer backends.  Nothing here touches CUDA.
"""
from __future__ import annotations

import importlib
import logging
from typing import Dict

_log = logging.getLogger("ultraedit_kernels")

# module -> why it could not be imported (None when it registered fine)
OPTIONAL_MODULES = ("_triton.pseudo_values", "_triton.stats_update", "_triton.gram")
IMPORT_ERRORS: Dict[str, str] = {}

for _name in OPTIONAL_MODULES:
    try:
        importlib.import_module(f"ultraedit_kernels.{_name}")
    except Exception as _err:  # never break import
        IMPORT_ERRORS[_name] = f"{type(_err).__name__}: {_err}"
        _log.debug("optional backend module %s not registered: %s", _name, _err)

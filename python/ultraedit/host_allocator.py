"""Keep freed host memory in the process: fewer page faults in long CPU runs (glibc).

A turn forwards and back-propagates the same requests up to a dozen times, and the evaluation
decodes thousands of prompts: every step allocates and frees the same few-MB activation and
logits tensors. glibc's ``malloc`` serves blocks above its mmap threshold with ``mmap`` and
gives them back with ``munmap``, and trims the heap's free top back to the operating system;
the next step's tensors of the same sizes then fault every page in again (about 400,000 minor
page faults per 100-edit turn of the embedded model's lifelong preset on the CPU). With
:func:`keep_freed_memory` every block comes from the heap and freed memory stays there for the
next step:

    mallopt(M_MMAP_MAX, 0)                   # no mmap per block (glibc still maps memory
                                             # when the heap cannot grow)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)     # do not give the heap's free top back

which is what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment does
at start-up. Both are needed: setting the trim threshold alone also freezes glibc's mmap
threshold at 128 KiB (it no longer grows as blocks are freed), and a turn then faults about 15x
more. Measured on a 2-core Intel Xeon (the project's ``experiments/host_allocator.py``, one
thread): a lifelong-preset turn with bfloat16 products 1.058x faster, in float32 and in decoding
the same within the noise; the same edited weights and answers to the bit, the same peak
resident size. The cost: the process keeps the freed memory instead of returning it, so its
resident size stays near its peak until it exits.

The ``ultraedit`` command applies it to ``demo``, ``run`` and ``tune`` (the demo's and the
run's JSON record the outcome under ``machine.host_allocator``); a library caller opts in by
calling it. It does nothing where it would override a choice already made or cannot apply:

- ``ULTRAEDIT_KEEP_FREED_MEMORY=0`` in the environment;
- the user set glibc's own malloc settings (``MALLOC_MMAP_MAX_``, ``MALLOC_MMAP_THRESHOLD_``,
  ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or ``glibc.malloc`` in ``GLIBC_TUNABLES``);
- another allocator is preloaded (jemalloc, tcmalloc or mimalloc in ``LD_PRELOAD``);
- the C library is not glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

__all__ = ["keep_freed_memory", "OPT_OUT"]

OPT_OUT = "ULTRAEDIT_KEEP_FREED_MEMORY"

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2 ** 31 - 1      # mallopt takes an int

_GLIBC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                   "MALLOC_TOP_PAD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _reason_to_skip(environ) -> Optional[str]:
    if environ.get(OPT_OUT, "").strip().lower() in ("0", "false", "no", "off"):
        return f"not applied: {OPT_OUT}={environ[OPT_OUT]}"
    chosen = [name for name in _GLIBC_SETTINGS if name in environ]
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if chosen:
        return f"not applied: malloc settings given in the environment ({', '.join(chosen)})"
    preload = environ.get("LD_PRELOAD", "")
    for name in _OTHER_ALLOCATORS:
        if name in preload:
            return f"not applied: {name} is preloaded"
    if not sys.platform.startswith("linux"):
        return f"not applied: not Linux ({sys.platform})"
    return None


def _glibc_version(libc) -> Optional[str]:
    """``gnu_get_libc_version()`` of ``libc``, or None where it is not glibc."""
    try:
        version = libc.gnu_get_libc_version
    except AttributeError:
        return None
    version.restype = ctypes.c_char_p
    return version().decode()


def keep_freed_memory(environ=None, libc=None) -> str:
    """Ask glibc's ``malloc`` to serve every block from its heap and keep freed memory (see the
    module docstring). Returns what happened, for result files: ``"kept freed memory (glibc
    2.36)"``, or ``"not applied: <why>"``; calling it again does no harm. ``environ`` and
    ``libc`` default to ``os.environ`` and the process's C library (tests give their own)."""
    environ = os.environ if environ is None else environ
    reason = _reason_to_skip(environ)
    if reason is not None:
        return reason
    if libc is None:
        try:
            libc = ctypes.CDLL(None)
        except OSError:
            return "not applied: the C library cannot be loaded"
    version = _glibc_version(libc)
    if version is None:
        return "not applied: the C library is not glibc"
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD,
                                                            _TRIM_THRESHOLD) == 1
    return (f"kept freed memory (glibc {version})" if ok
            else f"not applied: glibc {version} refused mallopt")

"""Solve symmetric positive definite systems ``A X = B`` by Cholesky factorization.

Formula: ``A = L Lᵀ`` (lower ``L``), then ``X = L⁻ᵀ (L⁻¹ B)``.

Shapes: ``A`` (..., n, n), ``B`` (..., n, k), float32 or float64 (same dtype); a leading batch
dimension solves one system per module of a turn.  Only the lower triangle of ``A`` is read.
Returns ``(X, info)``: ``info`` (..., ) int32 is 0 for a successful factorization and ``j > 0``
when the leading minor of order ``j`` is not positive definite (or holds NaN), as
``torch.linalg.cholesky_ex`` reports; ``X`` is then undefined and must not be used.

Equivalent PyTorch::

    L, info = torch.linalg.cholesky_ex(A)
    X = torch.cholesky_solve(B, L)
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Tuple

import torch

from . import _backends, _extension

_log = logging.getLogger("ultraedit_kernels")

OP = "spd_solve"


def spd_solve_reference(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    factor, info = torch.linalg.cholesky_ex(a)
    # LAPACK hands back a column-major solution; callers (and the fake) expect row-major.
    return torch.cholesky_solve(b, factor).contiguous(), info


@torch.library.custom_op("ultraedit::spd_solve", mutates_args=())
def spd_solve_op(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    _, fn = _backends.select(OP, a.device, a, b)
    return fn(a, b)


@spd_solve_op.register_fake
def _(a, b):
    return b.new_empty(b.shape), a.new_empty(a.shape[:-2], dtype=torch.int32)


_backends.register_impl(OP, "torch", spd_solve_reference)


# --- compiled implementations (csrc/: torch.ops.ultraedit_C.spd_solve) ------------------------

def _fake_native(a, b):
    return b.new_empty(b.shape), a.new_empty(a.shape[:-2], dtype=torch.int32)


_native_fake_registered = False


def _extension_ready(part: str) -> Optional[str]:
    """``None`` when the ``part`` ("cpu" / "cuda") of the extension is loaded; registers the
    fake (meta) implementation of ``ultraedit_C::spd_solve`` the first time it is."""
    global _native_fake_registered
    why = _extension.unavailable_reason(part)
    if why is None and not _native_fake_registered:
        _native_fake_registered = True
        try:
            torch.library.register_fake("ultraedit_C::spd_solve")(_fake_native)
        except Exception as err:  # a fake registered elsewhere already, or an old torch
            _log.debug("register_fake(ultraedit_C::spd_solve) skipped: %s", err)
    return why


def _cpp_available(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return "the cpp backend computes CPU tensors only"
    return _extension_ready("cpu")


def _cuda_available(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "the cuda backend computes CUDA tensors only"
    return _extension_ready("cuda")


def spd_solve_native(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The compiled blocked Cholesky (host build on CPU tensors, device build on CUDA)."""
    return torch.ops.ultraedit_C.spd_solve(a, b)


# Measured host-build / LAPACK (torch.linalg.cholesky_ex + cholesky_solve) median-time ratios
# on CPU, float32, k = 1024 right-hand sides, host build with its built-in GEMM (the default),
# from `pytest bench/bench_spd_solve.py` on a 2-core AMD EPYC (AVX-512) shared with other jobs
# (load average ~11, see docs/cholesky.md for the command and raw numbers).  Key (n, batched);
# None = not measured (the single-system ratio of the same n is used).  `auto` picks the host
# build only where it measured at least 5% faster (ratio < 0.95) at the nearest measured n.
CPU_MEASURED_RATIO = {
    (100, False): 0.33, (400, False): 0.60, (1000, False): 0.67, (4000, False): 0.96,
    (100, True): 0.29, (400, True): 0.25, (1000, True): 0.64, (4000, True): None,
}
CPU_FASTER_THAN = 0.95


def cpu_prefers_native(n: int, batched: bool) -> bool:
    """Whether ``auto`` uses the host build for an ``n x n`` system on CPU (measured table)."""
    sizes = sorted({size for size, _ in CPU_MEASURED_RATIO})
    nearest = min(sizes, key=lambda size: abs(math.log(max(n, 1)) - math.log(size)))
    ratio = CPU_MEASURED_RATIO[(nearest, bool(batched))]
    if ratio is None:
        ratio = CPU_MEASURED_RATIO[(nearest, False)]
    return ratio < CPU_FASTER_THAN


def _cpp_auto_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    batched = a.dim() > 2 and a.numel() > a.shape[-1] * a.shape[-2]
    return cpu_prefers_native(a.shape[-1], batched)


_backends.register_impl(OP, "cpp", spd_solve_native, available=_cpp_available,
                        auto_priority=1, auto_ok=_cpp_auto_ok)
# No GPU has measured the device build against cuSOLVER yet, so `auto` keeps torch.linalg
# (cuSOLVER) on CUDA: the device build runs only with ULTRAEDIT_BACKEND=cuda.
_backends.register_impl(OP, "cuda", spd_solve_native, available=_cuda_available,
                        auto_priority=-1)


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cholesky solve of SPD ``a @ x = b``; returns ``(x, info)`` (see the module docstring)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions, got shape {tuple(t.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a must be square in its last two dimensions, got {tuple(a.shape)}")
    if b.shape[-2] != a.shape[-1] or b.shape[:-2] != a.shape[:-2]:
        raise ValueError(
            f"b {tuple(b.shape)} does not match a {tuple(a.shape)}: expected (..., {a.shape[-1]}, k) "
            f"with the same batch dimensions")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")
    return spd_solve_op(a, b)

"""Solve symmetric positive definite systems ``A X = B`` by Cholesky factorization.

Formula: ``A = L Lᵀ`` (lower ``L``), then ``X = L⁻ᵀ (L⁻¹ B)``.

Shapes: ``A`` (..., n, n), ``B`` (..., n, k), float32 or float64 (a float32 / float64 pair is
solved in float64, the returned ``X`` is float64 then); a leading batch
dimension solves one system per module of a turn.  Only the lower triangle of ``A`` is read.
Returns ``(X, info)``: ``info`` (..., ) int32 is 0 for a successful factorization and ``j > 0``
when the leading minor of order ``j`` is not positive definite (or holds NaN), as
``torch.linalg.cholesky_ex`` reports; ``X`` is then undefined and must not be used.  The
reference and the host build solve a single 1 x 1 system as ``X = B / A`` (the same bits).

Equivalent PyTorch (the reference computes the same with right-side triangular solves, which
return X row-major without a copy)::

    L, info = torch.linalg.cholesky_ex(A)
    X = torch.cholesky_solve(B, L)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _backends, _extension
from ._validation import without_grad


OP = "spd_solve"


def spd_solve_reference(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cholesky_ex`` and two triangular solves from the right on ``Bᵀ``.

    ``Xᵀ = Bᵀ L⁻ᵀ L⁻¹``: a row-major B is a column-major Bᵀ, which LAPACK's right-side
    triangular solves take and return in place, so X comes back row-major (as the fake
    promises) without the copy that ``cholesky_solve(...).contiguous()`` makes (measured as
    fast as ``cholesky_solve`` alone, which returns a column-major X).
    """
    if _one_by_one(a, b):
        # a 1 x 1 system is one division: LAPACK's three calls cost ~40 µs of argument handling
        # for it (0.64x the plain cholesky + cholesky_solve with 4,096 right-hand sides on a
        # 2-core Intel Xeon); info is 1 where cholesky_ex's would be (a <= 0 or NaN)
        pivot = a[0, 0]
        info = torch.logical_not(pivot > 0).to(torch.int32)
        return b / pivot, info
    factor, info = torch.linalg.cholesky_ex(a)
    return solve_with_factor(factor, b), info


def solve_with_factor(factor: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``X = L⁻ᵀ (L⁻¹ B)`` for the lower Cholesky factor ``L`` of ``A`` (``A X = B``), row-major:
    two triangular solves from the right on ``Bᵀ`` (see :func:`spd_solve_reference`)."""
    if b.numel() == 0:
        return torch.empty_like(b, memory_format=torch.contiguous_format)
    y = torch.linalg.solve_triangular(factor.mT, b.mT, upper=True, left=False)
    x = torch.linalg.solve_triangular(factor, y, upper=False, left=False).mT
    return x if x.is_contiguous() else x.contiguous()


def _one_by_one(a: torch.Tensor, b: torch.Tensor) -> bool:
    """A single 1 x 1 system (no batch): the reference's one division."""
    return a.shape == (1, 1) and b.dim() == 2


def _spd_solve_body(a, b):
    if a.dtype != b.dtype:   # float32 with float64: solved in float64, as the fake says
        a, b = a.double(), b.double()
    _, fn = _backends.select(OP, a.device, a, b)
    return fn(a, b)


@torch.library.custom_op("ultraedit::spd_solve", mutates_args=())
def spd_solve_op(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _spd_solve_body(a, b)


spd_solve_call = _backends.eager(spd_solve_op, _spd_solve_body)


@spd_solve_op.register_fake
def _(a, b):
    return (b.new_empty(b.shape, dtype=torch.promote_types(a.dtype, b.dtype)),
            a.new_empty(a.shape[:-2], dtype=torch.int32))


_backends.register_impl(OP, "torch", spd_solve_reference)


# --- compiled implementations (csrc/: torch.ops.ultraedit_C.spd_solve) ------------------------

def _fake_native(a, b):
    return b.new_empty(b.shape), a.new_empty(a.shape[:-2], dtype=torch.int32)


def _cpp_available(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return "the cpp backend computes CPU tensors only"
    return _extension.native_op_ready("cpu", "spd_solve", _fake_native)


def _cuda_available(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "the cuda backend computes CUDA tensors only"
    return _extension.native_op_ready("cuda", "spd_solve", _fake_native)


def spd_solve_native(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The compiled blocked Cholesky (host build on CPU tensors, device build on CUDA)."""
    return torch.ops.ultraedit_C.spd_solve(a, b)


# `auto` uses either build only where this machine's calibration measured it faster than
# torch.linalg (LAPACK / cuSOLVER) and agreeing with it (ultraedit_kernels/calibration.py); a
# single 1 x 1 system, one division in the reference and in the host build, has a class of its
# own there (by the number of right-hand sides).
_backends.register_impl(OP, "cpp", spd_solve_native, available=_cpp_available)
_backends.register_impl(OP, "cuda", spd_solve_native, available=_cuda_available)


@without_grad
def spd_solve(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(X, info)`` with ``A X = B`` for symmetric positive definite ``A``, by Cholesky.

    ``a`` (..., n, n) (lower triangle read), ``b`` (..., n, k), float32/float64 (a mixed pair is
    solved in float64); ``info`` (...) int32 is 0, or ``j > 0`` where the leading minor of
    order ``j`` is not positive definite (``X`` is then undefined).

    Equivalent PyTorch: ``L, info = torch.linalg.cholesky_ex(a); X = torch.cholesky_solve(b,
    L)``."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions, got shape {tuple(t.shape)}")
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a must be square in its last two dimensions, got {tuple(a.shape)}")
    if b.shape[-2] != a.shape[-1] or b.shape[:-2] != a.shape[:-2]:
        raise ValueError(
            f"b {tuple(b.shape)} does not match a {tuple(a.shape)}: expected (..., {a.shape[-1]}, k) "
            f"with the same batch dimensions")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")
    return spd_solve_call(a, b)

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

from typing import Tuple

import torch

from . import _backends

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

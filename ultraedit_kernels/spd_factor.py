"""Factor a symmetric positive definite matrix once, solve with it many times.

For a system whose matrix stays fixed while its right-hand sides change (the editor's key
memory and preserved keys ``P = νM + μK_pᵀK_p + λI`` during a turn: one factorization, one
solve per step), :func:`spd_solve` would factor ``P`` again on every call.

Formula: ``spd_factor(A) = (L, info)`` with ``A = L Lᵀ`` (lower ``L``);
``spd_solve_factored(L, B) = X = L⁻ᵀ (L⁻¹ B)``, i.e. ``A X = B``.

Shapes: ``A`` (..., n, n) float32/float64 (only the lower triangle is read), ``L`` the same
shape and dtype; ``B`` (..., n, k) of ``L``'s dtype, ``X`` like ``B``. ``info`` (...,) int32 is
0 for a successful factorization and ``j > 0`` when the leading minor of order ``j`` is not
positive definite (or holds NaN), as ``torch.linalg.cholesky_ex`` reports; ``L`` must not be
used then.

Equivalent PyTorch (these are the reference implementations, and the CPU/CUDA path: LAPACK and
cuSOLVER have no faster equivalent to dispatch to)::

    L, info = torch.linalg.cholesky_ex(A)
    X = torch.cholesky_solve(B, L)
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import _backends
from ._validation import without_grad
from .spd_solve import solve_with_factor

__all__ = ["spd_factor", "spd_solve_factored", "spd_factor_op", "spd_solve_factored_op"]


def spd_factor_reference(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.linalg.cholesky_ex(a)


def spd_solve_factored_reference(factor: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # two right-side triangular solves on Bᵀ return X row-major without the copy that
    # `cholesky_solve(b, factor).contiguous()` makes (0.25-0.68x its time at the editor's shapes)
    return solve_with_factor(factor, b)


@torch.library.custom_op("ultraedit::spd_factor", mutates_args=())
def spd_factor_op(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return spd_factor_reference(a)


@spd_factor_op.register_fake
def _(a):
    # LAPACK / cuSOLVER return the factor column-major (its transpose is row-major); no copy
    return a.new_empty(a.shape).mT, a.new_empty(a.shape[:-2], dtype=torch.int32)


@torch.library.custom_op("ultraedit::spd_solve_factored", mutates_args=())
def spd_solve_factored_op(factor: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return spd_solve_factored_reference(factor, b)


@spd_solve_factored_op.register_fake
def _(factor, b):
    return b.new_empty(b.shape)


_factor_call = _backends.eager(spd_factor_op, spd_factor_reference)
_solve_call = _backends.eager(spd_solve_factored_op, spd_solve_factored_reference)
# the reference is the only implementation: registered so that `info` lists the two ops
_backends.register_impl("spd_factor", "torch", spd_factor_reference)
_backends.register_impl("spd_solve_factored", "torch", spd_solve_factored_reference)


def _check_matrix(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions, got shape {tuple(t.shape)}")


@without_grad
def spd_factor(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(L, info)`` with ``a = L Lᵀ``, ``L`` lower triangular: factor once, then solve many
    right-hand sides with :func:`spd_solve_factored`.

    ``a`` (..., n, n) float32/float64; ``info`` as in :func:`spd_solve`. Equivalent PyTorch:
    ``torch.linalg.cholesky_ex(a)``."""
    _check_matrix("a", a)
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a must be square in its last two dimensions, got {tuple(a.shape)}")
    return _factor_call(a)


@without_grad
def spd_solve_factored(factor: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``X`` with ``(L Lᵀ) X = b`` for a factor ``L`` from :func:`spd_factor`.

    ``factor`` (..., n, n), ``b`` (..., n, k) of its dtype and device; ``X`` (..., n, k)
    row-major. Equivalent PyTorch: ``torch.cholesky_solve(b, factor)``."""
    _check_matrix("factor", factor)
    _check_matrix("b", b)
    if factor.shape[-1] != factor.shape[-2]:
        raise ValueError(f"factor must be square in its last two dimensions, got "
                         f"{tuple(factor.shape)}")
    if b.shape[-2] != factor.shape[-1] or b.shape[:-2] != factor.shape[:-2]:
        raise ValueError(f"b {tuple(b.shape)} does not match the factor {tuple(factor.shape)}: "
                         f"expected (..., {factor.shape[-1]}, k) with the same batch dimensions")
    if b.dtype != factor.dtype:
        raise TypeError(f"b is {b.dtype} but the factor is {factor.dtype}; cast one of them")
    if b.device != factor.device:
        raise ValueError(f"the factor is on {factor.device} but b is on {b.device}")
    return _solve_call(factor, b)

"""Regularized Gram matrices of the key matrix.

Formula (``K`` is N x d, λ = ``ridge``)::

    rows:    G = K Kᵀ + λ I      (N x N, the dual system)
    columns: G = Kᵀ K + λ I      (d x d, the primal system)

``K`` may be any float dtype; the product is accumulated and returned in float32
(float64 input gives float64).  Equivalent PyTorch::

    Kf = K.float(); G = Kf @ Kf.T if rows else Kf.T @ Kf; G.diagonal().add_(ridge)
"""
from __future__ import annotations

import torch

from . import _backends
from ._validation import check_float_matrix, check_ridge

OP = "gram"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gram_reference(x: torch.Tensor, ridge: float, rows: bool) -> torch.Tensor:
    xf = x.to(_compute_dtype(x))
    g = xf @ xf.T if rows else xf.T @ xf
    g.diagonal().add_(ridge)
    return g


def _gram_body(x, ridge, rows):
    _, fn = _backends.select(OP, x.device, x, ridge, rows)
    return fn(x, ridge, rows)


@torch.library.custom_op("ultraedit::gram", mutates_args=())
def gram_op(x: torch.Tensor, ridge: float, rows: bool) -> torch.Tensor:
    return _gram_body(x, ridge, rows)


gram_call = _backends.eager(gram_op, _gram_body)


@gram_op.register_fake
def _(x, ridge, rows):
    n = x.shape[0] if rows else x.shape[1]
    return x.new_empty((n, n), dtype=_compute_dtype(x))


_backends.register_impl(OP, "torch", gram_reference)


def gram(x: torch.Tensor, ridge: float = 1.0, rows: bool = True) -> torch.Tensor:
    """``K Kᵀ + λI`` (``rows=True``) or ``Kᵀ K + λI`` (``rows=False``); see the module docstring."""
    check_float_matrix("x", x)
    check_ridge(ridge)
    return gram_call(x, float(ridge), bool(rows))

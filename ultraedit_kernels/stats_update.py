"""Merge a block of rows into running per-column count / mean / M2 (Chan's parallel formula).

Formula (block ``x`` of ``B`` rows, running state ``n, μ, M2``; all in float64)::

    μ_b  = mean(x, 0)
    M2_b = Σ_i (x_i - μ_b)²            compat="fixed"     (exact sum of squared deviations)
    M2_b = B · var_unbiased(x, 0)       compat="official"  (the reference code; NaN when B = 1)
    δ    = μ_b - μ
    n'   = n + B
    μ'   = μ + δ · B / n'
    M2'  = M2 + M2_b + δ² · n · B / n'

Shapes: ``x`` (B, D) any float dtype; ``count`` 0-d float64; ``mean``, ``m2`` (D,) float64.
Returns new ``(count, mean, m2)``; the inputs are not modified (a rejected or failed update
leaves the caller's state as it was).

Equivalent PyTorch::

    xb = x.double(); mb = xb.mean(0); m2b = ((xb - mb) ** 2).sum(0)
    d = mb - mean; n = count + B
    return n, mean + d * B / n, m2 + m2b + d * d * count * B / n
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import _backends

OP = "stats_update"
_ROW_CHUNK = 256  # bounds the float64 temporaries of the reference to 256 x D


def chan_merge(count, mean, m2, block_count: int, block_mean, block_m2):
    """Merge block moments into running ones (all float64 tensors); returns new tensors."""
    new_count = count + block_count
    delta = block_mean - mean
    ratio = block_count / new_count
    new_mean = mean + delta * ratio
    new_m2 = m2 + block_m2 + delta * delta * (count * ratio)
    return new_count, new_mean, new_m2


def block_moments_reference(x: torch.Tensor, official: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 (mean, M2) of the rows of ``x`` (the fixed or the reference code's M2).

    Rows are converted to float64 ``_ROW_CHUNK`` at a time and Chan-merged, so the temporary
    stays at ``_ROW_CHUNK x D`` whatever N is.  The reference code's ``B * var_unbiased`` equals
    ``B / (B - 1)`` times the exact sum of squared deviations (NaN for a single row).
    """
    rows = x.shape[0]
    count = torch.zeros((), dtype=torch.float64, device=x.device)
    mean = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    m2 = torch.zeros_like(mean)
    for start in range(0, rows, _ROW_CHUNK):
        xb = x[start:start + _ROW_CHUNK].double()
        mb = xb.mean(0)
        m2b = (xb - mb).square_().sum(0)
        count, mean, m2 = chan_merge(count, mean, m2, xb.shape[0], mb, m2b)
    if official:
        m2 = m2 * (rows / (rows - 1)) if rows > 1 else torch.full_like(m2, float("nan"))
    return mean, m2


def stats_update_reference(x, count, mean, m2, official: bool):
    """Pure-PyTorch float64 implementation (CPU path and test oracle)."""
    block_mean, block_m2 = block_moments_reference(x, official)
    return chan_merge(count, mean, m2, x.shape[0], block_mean, block_m2)


@torch.library.custom_op("ultraedit::stats_update", mutates_args=())
def stats_update_op(x: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                    official: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, fn = _backends.select(OP, x.device, x)
    new_count, new_mean, new_m2 = fn(x, count, mean, m2, official)
    return new_count.clone() if new_count is count else new_count, new_mean, new_m2


@stats_update_op.register_fake
def _(x, count, mean, m2, official):
    return torch.empty_like(count), torch.empty_like(mean), torch.empty_like(m2)


_backends.register_impl(OP, "torch", stats_update_reference)

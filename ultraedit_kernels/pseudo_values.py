"""UltraEdit pseudo-values from keys and output gradients, normalized by running statistics.

Formula (``z = [k ; g]``, running ``mean`` / ``std`` of z, ``eps`` = float32 machine epsilon)::

    k̂ = (k - mean[:d_in]) / (std[:d_in] + eps)
    ĝ = (g - mean[d_in:]) / (std[d_in:] + eps)
    v = -lr · ||k̂||² · ĝ

Shapes: ``keys`` (N, d_in), ``values_grad`` (N, d_out), any float dtype (computed in float32);
``mean``, ``std`` (d_in + d_out,) float64.  Returns ``V`` (N, d_out) float32.

Equivalent PyTorch::

    z = torch.cat([keys, values_grad], 1).float()
    z_hat = (z - mean.float()) / (std + eps).float()
    k_hat, g_hat = z_hat.split([d_in, d_out], 1)
    V = -lr * k_hat.pow(2).sum(1, keepdim=True) * g_hat
"""
from __future__ import annotations

import torch

from . import _backends
from ._validation import check_keys_grads
from .running_stats import EPS, FrozenStats, RunningStats

OP = "pseudo_values"


def pseudo_values_reference(keys, values_grad, mean, std, lr: float, eps: float):
    """Pure-PyTorch float32 implementation (CPU path); never builds the concatenated z."""
    d_in = keys.shape[1]
    inv_scale = (1.0 / (std + eps)).float()
    shift = mean.float()
    k_hat = (keys.float() - shift[:d_in]).mul_(inv_scale[:d_in])
    coeff = k_hat.square_().sum(1, keepdim=True).mul_(-lr)
    g_hat = (values_grad.float() - shift[d_in:]).mul_(inv_scale[d_in:])
    return g_hat.mul_(coeff)


@torch.library.custom_op("ultraedit::pseudo_values", mutates_args=())
def pseudo_values_op(keys: torch.Tensor, values_grad: torch.Tensor, mean: torch.Tensor,
                     std: torch.Tensor, lr: float, eps: float) -> torch.Tensor:
    _, fn = _backends.select(OP, keys.device, keys, values_grad)
    return fn(keys, values_grad, mean, std, lr, eps)


@pseudo_values_op.register_fake
def _(keys, values_grad, mean, std, lr, eps):
    return values_grad.new_empty(values_grad.shape, dtype=torch.float32)


_backends.register_impl(OP, "torch", pseudo_values_reference)


def check_stats_for(keys: torch.Tensor, values_grad: torch.Tensor, stats) -> None:
    """Validate ``stats`` (a RunningStats or FrozenStats) against the features' shapes."""
    if not isinstance(stats, (RunningStats, FrozenStats)):
        raise TypeError(f"stats must be a RunningStats or FrozenStats, got {type(stats).__name__}")
    expected = keys.shape[1] + values_grad.shape[1]
    if stats.dim != expected:
        raise ValueError(
            f"stats track dim={stats.dim} but keys/values_grad have d_in + d_out = "
            f"{keys.shape[1]} + {values_grad.shape[1]} = {expected}")
    if stats.device != keys.device:
        raise ValueError(f"stats live on {stats.device} but keys are on {keys.device}")
    if isinstance(stats, FrozenStats):
        if not bool(torch.isfinite(stats.mean).all() & torch.isfinite(stats.std).all()):
            raise ValueError("the given mean/std hold NaN/Inf")
        return
    if stats.count == 0:
        raise ValueError("stats are empty: update them with torch.cat([keys, values_grad], 1) first")
    if not bool(torch.isfinite(stats.m2).all()):
        raise ValueError(
            "stats hold NaN/Inf (compat='official' reproduces the reference code, whose M2 "
            "update is NaN after a one-row block); use compat='fixed' or larger blocks")


def pseudo_values(keys: torch.Tensor, values_grad: torch.Tensor, stats,
                  lr: float = 1e-6) -> torch.Tensor:
    """UltraEdit pseudo-values ``V`` (N x d_out, float32); see the module docstring.

    ``stats`` must already include this turn's rows (the paper updates before normalizing).
    """
    check_keys_grads(keys, values_grad)
    check_stats_for(keys, values_grad, stats)
    return pseudo_values_op(keys, values_grad, stats.mean, stats.std, float(lr), EPS)

"""UltraEdit pseudo-values from keys and output gradients, normalized by running statistics.

Formula (``z = [k ; g]``, running ``mean`` / ``std`` of z, ``eps`` = float32 machine epsilon)::

    k̂ = (k - mean[:d_in]) / (std[:d_in] + eps)
    ĝ = (g - mean[d_in:]) / (std[d_in:] + eps)
    v = -lr · ||k̂||² · ĝ

Shapes: ``keys`` (N, d_in), ``values_grad`` (N, d_out), any float dtype; ``mean``, ``std``
(d_in + d_out,) float64.  Returns ``V`` (N, d_out), computed and returned in float32, or in
float64 when ``keys`` or ``values_grad`` is float64.

Equivalent PyTorch::

    z = torch.cat([keys, values_grad], 1).float()
    z_hat = (z - mean.float()) / (std + eps).float()
    k_hat, g_hat = z_hat.split([d_in, d_out], 1)
    V = -lr * k_hat.pow(2).sum(1, keepdim=True) * g_hat
"""
from __future__ import annotations

import torch

from . import _backends
from ._validation import all_finite, check_keys_grads, check_lr, compute_dtype, without_grad
from .running_stats import EPS, FrozenStats, RunningStats

OP = "pseudo_values"


_normalizer_cache: list = [None]   # [((mean, std, versions, d_in, dtype, lr, eps), vectors)]


def _normalizer(mean, std, d_in: int, dtype, lr: float, eps: float):
    """``(shift_k, scale_k, shift_g, -lr * scale_g)`` in the compute dtype.

    Four small kernels, the same for every call of a turn (the statistics' mean and std are
    the same tensors until the next update), so the last result is kept; the cache holds the
    tensors themselves (their ids cannot be reused while cached) and their version counters.
    """
    key = (mean, std, mean._version, std._version, d_in, dtype, lr, eps)
    cached = _normalizer_cache[0]
    if cached is not None and len(cached[0]) == len(key) and all(
            a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(cached[0], key)):
        return cached[1]
    inv_scale = (1.0 / (std + eps)).to(dtype)
    shift = mean.to(dtype)
    vectors = (shift[:d_in], inv_scale[:d_in], shift[d_in:], inv_scale[d_in:] * -lr)
    _normalizer_cache[0] = (key, vectors)
    return vectors


# Large inputs are computed in slabs of rows small enough to stay in the core's cache (L2 is
# 1 MiB on the EPYC machine): the passes over a slab (subtract, scale, square and sum the keys;
# subtract, scale and scale by the row coefficient the gradients; the public op's finiteness
# sum) then read memory once, and no temporary of the keys' size is allocated (at N = 2000,
# d_in = 14336 that is 115 MB of fresh pages).  Every element is computed by the same kernels in
# the same order as in one pass (a row's sum of squares does not depend on the other rows, with
# one or two threads), so the result is bit-identical.  Measured (one thread, alternating
# rounds): 3.3-3.8x faster than one pass at N = 2000, 14336 -> 4096, 1.05-1.15x at 4096 -> 14336
# (N = 400, 2000); below ~16 MiB of input the per-slab dispatch outweighs the saving.
_SLAB_BYTES = 1 << 20
_SLAB_MIN_INPUT = 16 << 20


def _slab_rows(n: int, d_in: int, d_out: int, itemsize: int) -> int:
    if n * (d_in + d_out) * itemsize < _SLAB_MIN_INPUT:
        return n
    return max(8, _SLAB_BYTES // (itemsize * (d_in + d_out)))


def pseudo_values_torch(keys, values_grad, mean, std, lr: float, eps: float, check: bool = False):
    """``(V, finite)``: the pure-PyTorch pseudo-values and, when ``check``, whether every value
    is finite (``None`` otherwise).  Never builds the concatenated z.

    Each input is read once: the subtraction promotes it to the compute dtype as it goes (no
    separate cast), everything after it works in place on that one temporary; ``-lr`` rides on
    the gradients' scale.  Large inputs go slab by slab (see ``_SLAB_BYTES``).
    """
    dtype = compute_dtype(keys, values_grad)
    shift_k, scale_k, shift_g, scale_g = _normalizer(
        mean, std, keys.shape[1], dtype, float(lr), float(eps))
    n = keys.shape[0]
    rows = _slab_rows(n, keys.shape[1], values_grad.shape[1], torch.finfo(dtype).bits // 8)
    if rows >= n:
        coeff = torch.sub(keys, shift_k).mul_(scale_k).square_().sum(1, keepdim=True)
        # Into a row-major buffer: the op promises (and its fake reports) a contiguous result,
        # where torch.sub would keep a column-major ``values_grad``'s layout.
        values = torch.empty(values_grad.shape, dtype=dtype, device=values_grad.device)
        torch.sub(values_grad, shift_g, out=values).mul_(scale_g).mul_(coeff)
        return values, (all_finite(values) if check else None)
    values = torch.empty(values_grad.shape, dtype=dtype, device=values_grad.device)
    k_hat = torch.empty((rows, keys.shape[1]), dtype=dtype, device=keys.device)
    coeff = torch.empty((n, 1), dtype=dtype, device=keys.device)
    finite = True if check else None
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        k = torch.sub(keys[start:stop], shift_k, out=k_hat[:stop - start]).mul_(scale_k).square_()
        c = torch.sum(k, 1, keepdim=True, out=coeff[start:stop])
        v = torch.sub(values_grad[start:stop], shift_g, out=values[start:stop])
        v.mul_(scale_g).mul_(c)
        if check and finite:
            finite = all_finite(v)
    return values, finite


def pseudo_values_reference(keys, values_grad, mean, std, lr: float, eps: float):
    """Pure-PyTorch implementation (CPU path); see :func:`pseudo_values_torch`."""
    return pseudo_values_torch(keys, values_grad, mean, std, lr, eps)[0]


def _pseudo_values_body(keys, values_grad, mean, std, lr, eps):
    _, fn = _backends.select(OP, keys.device, keys, values_grad)
    return fn(keys, values_grad, mean, std, lr, eps)


@torch.library.custom_op("ultraedit::pseudo_values", mutates_args=())
def pseudo_values_op(keys: torch.Tensor, values_grad: torch.Tensor, mean: torch.Tensor,
                     std: torch.Tensor, lr: float, eps: float) -> torch.Tensor:
    return _pseudo_values_body(keys, values_grad, mean, std, lr, eps)


pseudo_values_call = _backends.eager(pseudo_values_op, _pseudo_values_body)


@pseudo_values_op.register_fake
def _(keys, values_grad, mean, std, lr, eps):
    return values_grad.new_empty(values_grad.shape, dtype=compute_dtype(keys, values_grad))


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
    if not stats.is_nonempty():
        raise ValueError("stats are empty: update them with torch.cat([keys, values_grad], 1) first")
    if not stats.m2_is_finite():
        raise ValueError(
            "stats hold NaN/Inf (compat='official' reproduces the reference code, whose M2 "
            "update is NaN after a one-row block); use compat='fixed' or larger blocks")


@without_grad
def pseudo_values(keys: torch.Tensor, values_grad: torch.Tensor, stats,
                  lr: float = 1e-6) -> torch.Tensor:
    """UltraEdit pseudo-values ``V`` (N x d_out, float32; float64 for float64 inputs):
    ``V = -lr · ||k̂||² · ĝ`` with ``k̂``, ``ĝ`` the keys (N x d_in) and output gradients
    (N x d_out) normalized by ``stats`` (``(x - mean) / (std + eps)``, per column of
    ``[keys ; values_grad]``); the module docstring gives the equivalent PyTorch.

    ``stats`` must already include this turn's rows (the paper updates before normalizing).
    Raises ``ValueError`` for NaN/Inf in the inputs or a result that overflows.
    """
    check_keys_grads(keys, values_grad, finite=False)
    check_stats_for(keys, values_grad, stats)
    check_lr(lr)
    if not torch.compiler.is_compiling():
        backend, fn = _backends.select(OP, keys.device, keys, values_grad)
        if backend == "torch":   # the finiteness check rides along, slab by slab
            values, finite = pseudo_values_torch(keys, values_grad, stats.mean, stats.std,
                                                 float(lr), EPS, check=True)
            if not finite:
                check_result("pseudo_values", values, keys, values_grad)
            return values
        values = fn(keys, values_grad, stats.mean, stats.std, float(lr), EPS)
    else:
        values = pseudo_values_op(keys, values_grad, stats.mean, stats.std, float(lr), EPS)
    check_result("pseudo_values", values, keys, values_grad)
    return values


def check_result(what: str, result: torch.Tensor, keys: torch.Tensor,
                 values_grad: torch.Tensor) -> None:
    """Raise if ``result`` holds NaN/Inf, naming the input that caused it.

    Every value of V depends on a whole row of K (through ``||k̂||²``) and on one element of G,
    and NaN/Inf propagate through every later step, so one pass over the result checks the
    inputs too; they are inspected only to word the error.
    """
    if all_finite(result):
        return
    check_keys_grads(keys, values_grad, finite=True)
    raise ValueError(f"{what}: the result overflows (NaN/Inf) although keys and values_grad are "
                     f"finite; lr is too large for these features or the statistics are "
                     f"degenerate")

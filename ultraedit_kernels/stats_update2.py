"""``ultraedit::stats_update2``: merge the rows of ``[keys ; grads]`` into running statistics
without concatenating them.

Same formula as :mod:`.stats_update` applied to ``x = torch.cat([keys, grads], 1)``; since every
column's moments are independent, the block moments of ``keys`` fill columns ``[0, d_in)`` and
those of ``grads`` columns ``[d_in, d_in + d_out)``.

Shapes: ``keys`` (B, d_in), ``grads`` (B, d_out), any float dtype; ``count`` 0-d float64;
``mean``, ``m2`` (d_in + d_out,) float64.  Returns new ``(count, mean, m2)``; the inputs are
not modified.

Backends: ``torch`` (below) and, on the CPU, ``cpp`` (the kernel of :mod:`.stats_update`, which
takes the two blocks side by side without copying them).

Equivalent PyTorch::

    stats_update_reference(torch.cat([keys, grads], 1), count, mean, m2, official)
"""
from __future__ import annotations

import importlib
from typing import Tuple

import torch

from . import _backends
from ._validation import check_keys_grads

OP = "stats_update2"
# the package re-exports names that shadow some op modules: import the module itself
_stats = importlib.import_module("ultraedit_kernels.stats_update")


def stats_update2_reference(keys, grads, count, mean, m2, official: bool):
    """Pure-PyTorch float64 implementation (CPU path and test oracle); never concatenates."""
    k_mean, k_m2 = _stats.block_moments_reference(keys, official)
    g_mean, g_m2 = _stats.block_moments_reference(grads, official)
    return _stats.chan_merge(count, mean, m2, keys.shape[0], torch.cat([k_mean, g_mean]),
                             torch.cat([k_m2, g_m2]))


def _stats_update2_body(keys, grads, count, mean, m2, official):
    _stats.check_state_dtypes(count, mean, m2)
    _, fn = _backends.select(OP, keys.device, keys, grads)
    new_count, new_mean, new_m2 = fn(keys, grads, count, mean, m2, official)
    return new_count.clone() if new_count is count else new_count, new_mean, new_m2


@torch.library.custom_op("ultraedit::stats_update2", mutates_args=())
def stats_update2_op(keys: torch.Tensor, grads: torch.Tensor, count: torch.Tensor,
                     mean: torch.Tensor, m2: torch.Tensor,
                     official: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _stats_update2_body(keys, grads, count, mean, m2, official)


stats_update2_call = _backends.eager(stats_update2_op, _stats_update2_body)


@stats_update2_op.register_fake
def _(keys, grads, count, mean, m2, official):
    return torch.empty_like(count), torch.empty_like(mean), torch.empty_like(m2)


_backends.register_impl(OP, "torch", stats_update2_reference)


def stats_update2_native(keys, grads, count, mean, m2, official: bool):
    """The host build (:func:`.stats_update.stats_update_native`) on ``keys`` and ``grads``."""
    return torch.ops.ultraedit_C.stats_update(_stats.native_blocks(keys, grads), count, mean, m2,
                                              bool(official))


_backends.register_impl(OP, "cpp", stats_update2_native, available=_stats.cpp_available)


def update_stats_pair(stats, keys: torch.Tensor, grads: torch.Tensor, *,
                      check_finite_values: bool = True):
    """``stats.update(torch.cat([keys, grads], 1))`` without the concatenation: the running
    count, mean and M2 (float64) of ``[keys ; grads]`` merged with this block (Chan et al.).

    ``keys`` (N, d_in), ``grads`` (N, d_out), any float dtype; ``stats`` is a
    :class:`~ultraedit_kernels.RunningStats` with ``dim = d_in + d_out``, updated in place and
    returned.  Rejected input leaves it unchanged.
    """
    check_keys_grads(keys, grads, finite=False)
    if keys.shape[1] + grads.shape[1] != stats.dim:
        raise ValueError(
            f"keys/grads have d_in + d_out = {keys.shape[1]} + {grads.shape[1]} columns but these "
            f"statistics track dim={stats.dim}")
    if keys.device != stats.device:
        if stats.count == 0:
            stats.to(keys.device)
        else:
            raise ValueError(f"keys are on {keys.device} but the statistics live on {stats.device}")
    count, mean, m2 = stats_update2_call(
        keys, grads, stats.count_tensor, stats.mean, stats.m2, stats.compat == "official")
    if check_finite_values:
        stats._check_merged(mean, m2, keys.shape[0], keys=keys, grads=grads)
    stats._count, stats._mean, stats._m2 = count, mean, m2
    return stats

"""Triton kernels for ``ultraedit::stats_update`` and ``ultraedit::stats_update2``.

Two launches per update (three for the pair op), one read of the block:

1. ``_stats_partial_kernel``: program ``(column tile, row split)`` walks its rows in tiles of
   ``BLOCK_R``.  Values are shifted by the split's first row ``s`` (``y = x - s``); each tile's
   per-column mean and M2 are computed in float32 *within the tile* (two passes over
   registers: ``m_t = Σy / c``, ``M2_t = Σ(y - m_t)²``), then Chan-merged into float64
   accumulators (the tile mean enters as ``float64(Σy) / c``).  Writes the split's float64 (mean, M2) to a small buffer
   ``(splits, D)``.  The pair op runs it once for K (columns ``[0, d_in)``) and once for G
   (columns ``[d_in, D)``) into the same buffer: no concatenation.
2. ``_stats_finalize_kernel``: Chan-merges the splits (float64), applies the compat rule
   (``official``: ``M2_b · B / (B - 1)``, i.e. ``B · var_unbiased``; NaN for B = 1) and merges
   the block into the running ``(count, mean, M2)``::

       δ = μ_b - μ;  n' = n + B;  μ' = μ + δ·B/n';  M2' = M2 + M2_b + δ²·n·B/n'

Accuracy: each float32 sum runs over at most ``BLOCK_R`` shifted rows, and M2 over deviations
from the tile's own mean, so the error grows neither with N nor with the offset of the data; everything across tiles is
float64.  Float64 input goes to the reference (exact).
"""
from __future__ import annotations

import importlib

import torch
import triton
import triton.language as tl

from .. import _backends
from ._common import (INTERPRET, SUPPORTED_DTYPES, TRITON_DTYPE, AotSpec, auto_ok, available,
                      rows_contiguous)

_op = importlib.import_module("ultraedit_kernels.stats_update")
_op2 = importlib.import_module("ultraedit_kernels.stats_update2")


@triton.jit
def _stats_partial_kernel(x_ptr, pmean_ptr, pm2_ptr, n_rows, n_cols, stride_x, col_offset,
                          stride_p, rows_per_split,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < n_cols
    r_start = pid_s * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, n_rows)
    offs_r = tl.arange(0, BLOCK_R)
    # shift: the split's first row (float32 sums then run over x - shift, small numbers)
    shift = tl.load(x_ptr + r_start.to(tl.int64) * stride_x + cols, mask=cmask,
                    other=0.0).to(tl.float32)
    acc_mean = tl.zeros([BLOCK_D], dtype=tl.float64)   # mean of (x - shift)
    acc_m2 = tl.zeros([BLOCK_D], dtype=tl.float64)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + offs_r
        rmask = rows < r_end
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift[None, :], 0.0)
        cnt = tl.minimum(r_end - r0, BLOCK_R)
        t_sum = tl.sum(x, axis=0)
        t_mean = t_sum / cnt.to(tl.float32)
        dev = tl.where(mask, x - t_mean[None, :], 0.0)
        t_m2 = tl.sum(dev * dev, axis=0)
        # Chan merge of the tile into the split's float64 accumulators
        n_before = (r0 - r_start).to(tl.float64)
        c64 = cnt.to(tl.float64)
        n_after = n_before + c64
        delta = t_sum.to(tl.float64) / c64 - acc_mean
        acc_mean += delta * (c64 / n_after)
        acc_m2 += t_m2.to(tl.float64) + delta * delta * (n_before * c64 / n_after)
    out = pid_s.to(tl.int64) * stride_p + col_offset + cols
    tl.store(pmean_ptr + out, acc_mean + shift.to(tl.float64), mask=cmask)
    tl.store(pm2_ptr + out, acc_m2, mask=cmask)


@triton.jit
def _stats_finalize_kernel(pmean_ptr, pm2_ptr, count_ptr, mean_ptr, m2_ptr, out_mean_ptr,
                           out_m2_ptr, n_rows, rows_per_split, n_splits, n_cols,
                           OFFICIAL: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < n_cols
    b_mean = tl.zeros([BLOCK_D], dtype=tl.float64)
    b_m2 = tl.zeros([BLOCK_D], dtype=tl.float64)
    for s in range(0, n_splits):
        n_before = (s * rows_per_split).to(tl.float64)
        c64 = tl.minimum(rows_per_split, n_rows - s * rows_per_split).to(tl.float64)
        n_after = n_before + c64
        s_mean = tl.load(pmean_ptr + s * n_cols + cols, mask=cmask, other=0.0)
        s_m2 = tl.load(pm2_ptr + s * n_cols + cols, mask=cmask, other=0.0)
        delta = s_mean - b_mean
        b_mean += delta * (c64 / n_after)
        b_m2 += s_m2 + delta * delta * (n_before * c64 / n_after)
    nb = n_rows.to(tl.float64)
    if OFFICIAL:
        # the reference code's B * var_unbiased = M2_b * B / (B - 1); NaN for a one-row block
        b_m2 = tl.where(n_rows > 1, b_m2 * (nb / tl.maximum(nb - 1.0, 1.0)), float("nan"))
    count = tl.load(count_ptr).to(tl.float64)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    m2 = tl.load(m2_ptr + cols, mask=cmask, other=0.0)
    new_count = count + nb
    delta = b_mean - mean
    ratio = nb / new_count
    tl.store(out_mean_ptr + cols, mean + delta * ratio, mask=cmask)
    tl.store(out_m2_ptr + cols, m2 + b_m2 + delta * delta * (count * ratio), mask=cmask)


# (BLOCK_R, BLOCK_D, num_warps, num_stages) of the partial kernel; finalize: (BLOCK_D, warps)
PARTIAL_CONFIG = (32, 128, 4, 2)
FINALIZE_CONFIG = (256, 4)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda" and not INTERPRET:
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs (each one is a Python loop), still exercises splits


def choose_splits(n_rows: int, n_cols: int, device: torch.device, splits=None):
    """``(n_splits, rows_per_split)``: enough programs to fill the device, no empty split."""
    block_r, block_d = PARTIAL_CONFIG[:2]
    row_tiles = triton.cdiv(n_rows, block_r)
    if splits is None:
        splits = triton.cdiv(_target_programs(device), triton.cdiv(n_cols, block_d))
    splits = max(1, min(int(splits), row_tiles))
    rows_per_split = triton.cdiv(row_tiles, splits) * block_r
    return triton.cdiv(n_rows, rows_per_split), rows_per_split


def _partial(x, pmean, pm2, col_offset, rows_per_split, n_splits):
    x = rows_contiguous(x)
    n_rows, n_cols = x.shape
    block_r, block_d, warps, stages = PARTIAL_CONFIG
    grid = (triton.cdiv(n_cols, block_d), n_splits)
    _stats_partial_kernel[grid](x, pmean, pm2, n_rows, n_cols, x.stride(0), col_offset,
                                pmean.stride(0), rows_per_split,
                                BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
                                num_stages=stages)


def _finalize(pmean, pm2, count, mean, m2, n_rows, rows_per_split, n_splits, official):
    n_cols = mean.shape[0]
    count = count.to(torch.float64).reshape(1)
    mean = mean.to(torch.float64).contiguous()
    m2 = m2.to(torch.float64).contiguous()
    out_mean = torch.empty_like(mean)
    out_m2 = torch.empty_like(m2)
    block_d, warps = FINALIZE_CONFIG
    _stats_finalize_kernel[(triton.cdiv(n_cols, block_d),)](
        pmean, pm2, count, mean, m2, out_mean, out_m2, n_rows, rows_per_split, n_splits, n_cols,
        OFFICIAL=bool(official), BLOCK_D=block_d, num_warps=warps)
    return (count + n_rows).reshape(()), out_mean, out_m2


def stats_update_triton(x, count, mean, m2, official: bool, splits=None):
    """Launcher for ``ultraedit::stats_update`` (``splits`` forces the row split, for tests)."""
    if x.dtype not in SUPPORTED_DTYPES:
        return _op.stats_update_reference(x, count, mean, m2, official)
    n_rows, n_cols = x.shape
    n_splits, rows_per_split = choose_splits(n_rows, n_cols, x.device, splits)
    pmean = torch.empty((n_splits, n_cols), dtype=torch.float64, device=x.device)
    pm2 = torch.empty_like(pmean)
    _partial(x, pmean, pm2, 0, rows_per_split, n_splits)
    return _finalize(pmean, pm2, count, mean, m2, n_rows, rows_per_split, n_splits, official)


def stats_update2_triton(keys, grads, count, mean, m2, official: bool, splits=None):
    """Launcher for ``ultraedit::stats_update2``: K and G read in place, never concatenated."""
    if keys.dtype not in SUPPORTED_DTYPES or grads.dtype not in SUPPORTED_DTYPES:
        return _op2.stats_update2_reference(keys, grads, count, mean, m2, official)
    n_rows, d_in = keys.shape
    n_cols = d_in + grads.shape[1]
    n_splits, rows_per_split = choose_splits(n_rows, n_cols, keys.device, splits)
    pmean = torch.empty((n_splits, n_cols), dtype=torch.float64, device=keys.device)
    pm2 = torch.empty_like(pmean)
    _partial(keys, pmean, pm2, 0, rows_per_split, n_splits)
    _partial(grads, pmean, pm2, d_in, rows_per_split, n_splits)
    return _finalize(pmean, pm2, count, mean, m2, n_rows, rows_per_split, n_splits, official)


def aot_specs():
    """Every configuration the launchers can launch."""
    specs = []
    block_r, block_d, warps, stages = PARTIAL_CONFIG
    for dtype in SUPPORTED_DTYPES:
        t = TRITON_DTYPE[dtype]
        specs.append(AotSpec(
            name=f"stats_partial[{t}]", kernel=_stats_partial_kernel,
            signature={"x_ptr": f"*{t}", "pmean_ptr": "*fp64", "pm2_ptr": "*fp64",
                       "n_rows": "i32", "n_cols": "i32", "stride_x": "i32", "col_offset": "i32",
                       "stride_p": "i32", "rows_per_split": "i32"},
            constexprs={"BLOCK_R": block_r, "BLOCK_D": block_d},
            num_warps=warps, num_stages=stages,
            divisible=("x_ptr", "pmean_ptr", "pm2_ptr", "n_cols", "stride_x", "stride_p",
                       "rows_per_split")))
    fin_d, fin_warps = FINALIZE_CONFIG
    for official in (False, True):
        specs.append(AotSpec(
            name=f"stats_finalize[{'official' if official else 'fixed'}]",
            kernel=_stats_finalize_kernel,
            signature={"pmean_ptr": "*fp64", "pm2_ptr": "*fp64", "count_ptr": "*fp64",
                       "mean_ptr": "*fp64", "m2_ptr": "*fp64", "out_mean_ptr": "*fp64",
                       "out_m2_ptr": "*fp64", "n_rows": "i32", "rows_per_split": "i32",
                       "n_splits": "i32", "n_cols": "i32"},
            constexprs={"OFFICIAL": official, "BLOCK_D": fin_d},
            num_warps=fin_warps, num_stages=3,
            divisible=("pmean_ptr", "pm2_ptr", "count_ptr", "mean_ptr", "m2_ptr",
                       "out_mean_ptr", "out_m2_ptr", "n_cols")))
    return specs


_backends.register_impl(_op.OP, "triton", stats_update_triton, available=available,
                        auto_priority=10, auto_ok=auto_ok)
_backends.register_impl(_op2.OP, "triton", stats_update2_triton, available=available,
                        auto_priority=10, auto_ok=auto_ok)

"""Fused Triton kernel for ``ultraedit::pseudo_values`` (registered as the ``triton`` backend).

One program owns ``BLOCK_N`` rows.  It streams its rows of K once (``BLOCK_D`` columns at a
time), normalizes them with the float64 running statistics and accumulates ``||k̂_i||²`` in
float32; then streams its rows of G once and writes ``v = -lr · ||k̂||² · ĝ``.  Neither
``z = [k ; g]`` nor ``k̂`` / ``ĝ`` ever exists in memory::

    shift = float32(mean);  scale = float32(1 / (std + eps))      (computed from float64)
    ||k̂_i||² = Σ_j ((k_ij - shift_j) · scale_j)²                 (float32 accumulation)
    v_ij     = -lr · ||k̂_i||² · (g_ij - shift_{d_in+j}) · scale_{d_in+j}

Bytes moved: N·(d_in + d_out)·sizeof(input) read + N·d_out·4 written (+ the statistics, which
every program re-reads from L2).
"""
from __future__ import annotations

import importlib

import torch
import triton
import triton.language as tl

from .. import _backends
from ._common import (SUPPORTED_DTYPES, TRITON_DTYPE, AotSpec, auto_ok, available, launch_dtype,
                      rows_contiguous)

# the package re-exports a function named like the module: import the module itself
_op = importlib.import_module("ultraedit_kernels.pseudo_values")


@triton.jit
def _pseudo_values_forward_kernel(k_ptr, g_ptr, mean_ptr, std_ptr, v_ptr,
                                  n_rows, d_in, d_out, stride_k, stride_g, stride_v,
                                  neg_lr, eps,
                                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)

    # pass over K: ||k̂||² per row
    sq = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, d_in, BLOCK_D):
        c = start + cols
        cmask = c < d_in
        mu = tl.load(mean_ptr + c, mask=cmask, other=0.0)
        sd = tl.load(std_ptr + c, mask=cmask, other=1.0)
        shift = mu.to(tl.float32)
        scale = (1.0 / (sd + eps)).to(tl.float32)
        k = tl.load(k_ptr + rows64[:, None] * stride_k + c[None, :],
                    mask=row_mask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        k_hat = (k - shift[None, :]) * scale[None, :]   # masked columns: (0 - 0) * s = 0
        sq += k_hat * k_hat
    coeff = tl.sum(sq, axis=1) * neg_lr                  # (BLOCK_N,)

    # pass over G: V = coeff * ĝ
    for start in range(0, d_out, BLOCK_D):
        c = start + cols
        cmask = c < d_out
        mu = tl.load(mean_ptr + d_in + c, mask=cmask, other=0.0)
        sd = tl.load(std_ptr + d_in + c, mask=cmask, other=1.0)
        shift = mu.to(tl.float32)
        scale = (1.0 / (sd + eps)).to(tl.float32)
        mask = row_mask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + rows64[:, None] * stride_g + c[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        v = ((g - shift[None, :]) * scale[None, :]) * coeff[:, None]
        tl.store(v_ptr + rows64[:, None] * stride_v + c[None, :], v, mask=mask)


# (BLOCK_N, BLOCK_D, num_warps, num_stages): the launcher picks by N; the AOT test compiles all.
CONFIGS = {
    "small": (4, 512, 4, 2),    # few rows: more programs
    "large": (8, 512, 8, 2),
}
LARGE_ROWS = 1024


def choose_config(n_rows: int) -> str:
    return "large" if n_rows >= LARGE_ROWS else "small"


def pseudo_values_triton(keys, values_grad, mean, std, lr: float, eps: float):
    """Launcher with the signature of the op's implementations (see ``pseudo_values.py``)."""
    dtype = launch_dtype(keys, values_grad)
    if dtype is None:  # float64 input: the reference is exact there
        return _op.pseudo_values_reference(keys, values_grad, mean, std, lr, eps)
    keys = rows_contiguous(keys.to(dtype))
    values_grad = rows_contiguous(values_grad.to(dtype))
    mean = mean.to(torch.float64).contiguous()
    std = std.to(torch.float64).contiguous()
    n_rows, d_in = keys.shape
    d_out = values_grad.shape[1]
    out = torch.empty((n_rows, d_out), dtype=torch.float32, device=keys.device)
    block_n, block_d, warps, stages = CONFIGS[choose_config(n_rows)]
    grid = (triton.cdiv(n_rows, block_n),)
    _pseudo_values_forward_kernel[grid](
        keys, values_grad, mean, std, out, n_rows, d_in, d_out,
        keys.stride(0), values_grad.stride(0), out.stride(0), -float(lr), float(eps),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    return out


def aot_specs():
    """Every configuration the launcher can launch (aligned rows, unit column stride)."""
    specs = []
    for dtype in SUPPORTED_DTYPES:
        t = TRITON_DTYPE[dtype]
        for cfg, (block_n, block_d, warps, stages) in CONFIGS.items():
            specs.append(AotSpec(
                name=f"pseudo_values[{t},{cfg}]", kernel=_pseudo_values_forward_kernel,
                signature={"k_ptr": f"*{t}", "g_ptr": f"*{t}", "mean_ptr": "*fp64",
                           "std_ptr": "*fp64", "v_ptr": "*fp32", "n_rows": "i32", "d_in": "i32",
                           "d_out": "i32", "stride_k": "i32", "stride_g": "i32",
                           "stride_v": "i32", "neg_lr": "fp32", "eps": "fp32"},
                constexprs={"BLOCK_N": block_n, "BLOCK_D": block_d},
                num_warps=warps, num_stages=stages,
                divisible=("k_ptr", "g_ptr", "mean_ptr", "std_ptr", "v_ptr", "d_in", "d_out",
                           "stride_k", "stride_g", "stride_v")))
    return specs


_backends.register_impl(_op.OP, "triton", pseudo_values_triton, available=available,
                        auto_priority=10, auto_ok=auto_ok)

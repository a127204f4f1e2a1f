"""Triton kernel for ``ultraedit::gram``: ``K Kᵀ + λI`` (dual) and ``Kᵀ K + λI`` (primal).

Both are ``C = X Xᵀ + λI`` for ``X = K`` (rows) or ``X = Kᵀ`` (columns, by strides: no copy).
Program ``(i, j)`` with ``i >= j`` computes the ``BLOCK_M x BLOCK_M`` tile ``X_i X_jᵀ`` with
``tl.dot`` over ``BLOCK_K`` slices (float32 accumulation; float32 input uses
``input_precision="ieee"``, i.e. no TF32), adds λ on the diagonal, stores the part of it on
or below the diagonal, and stores the transpose of the part strictly below it in the upper
triangle: half the work of a general matmul, and the full matrix the op promises, exactly
symmetric by construction (``spd_solve`` reads only the lower triangle).  Programs with
``j > i`` exit.

Split-K: a turn's Gram matrix is small (N = 100-400 keys) over a long reduction (d = 4096-14336),
so the lower tiles alone are a handful of programs on a GPU of 100+ multiprocessors (3 programs
for N = 100: 0.05-0.5x torch on an H200).  Program ``(i, j, s)`` then reduces only the ``s``-th
of ``SPLIT`` equal runs of ``k`` into its own ``m x m`` slice of a float32 buffer, and the slices
are summed in a fixed order (``buffer.sum(0)``): deterministic, and still exactly symmetric
(element ``(a, b)`` and ``(b, a)`` are the same sums in the same order).  λ is added by split 0.

Under ``TRITON_INTERPRET=1`` bf16/fp16 tiles are cast to float32 before ``tl.dot`` (the
interpreter's dot is NumPy's).  Float64 input goes to the reference (float64 result).
"""
from __future__ import annotations

import importlib

import torch
import triton
import triton.language as tl

from .. import _backends
from ._common import INTERPRET, SUPPORTED_DTYPES, TRITON_DTYPE, AotSpec, auto_ok, available

_op = importlib.import_module("ultraedit_kernels.gram")


@triton.jit
def _gram_kernel(x_ptr, c_ptr, m_size, k_size, k_per_split, stride_m, stride_k, stride_c, ridge,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                 IEEE: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    if pid_j > pid_i:
        return
    k_start = pid_s * k_per_split          # k_per_split is a multiple of BLOCK_K
    k_end = tl.minimum(k_start + k_per_split, k_size)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_i = offs_i < m_size
    mask_j = offs_j < m_size
    a_ptrs = (x_ptr + offs_i.to(tl.int64)[:, None] * stride_m
              + (k_start + offs_k).to(tl.int64)[None, :] * stride_k)
    b_ptrs = (x_ptr + offs_j.to(tl.int64)[None, :] * stride_m
              + (k_start + offs_k).to(tl.int64)[:, None] * stride_k)
    acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kmask = (k0 + offs_k) < k_end
        a = tl.load(a_ptrs, mask=mask_i[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & mask_j[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_k
        b_ptrs += BLOCK_K * stride_k
    acc += tl.where((offs_i[:, None] == offs_j[None, :]) & (pid_s == 0), ridge, 0.0)
    mask = mask_i[:, None] & mask_j[None, :]
    c_ptr += pid_s.to(tl.int64) * m_size * stride_c     # this split's slice of the buffer
    ci = offs_i.to(tl.int64)
    cj = offs_j.to(tl.int64)
    # Only the lower triangle is stored as computed; the upper triangle is its mirror, so the
    # result is symmetric bit for bit (a diagonal tile's own dot need not be: its two halves
    # are summed in different orders by some BLAS/MMA paths).
    lower = ci[:, None] >= cj[None, :]
    strictly_lower = ci[:, None] > cj[None, :]
    tl.store(c_ptr + ci[:, None] * stride_c + cj[None, :], acc, mask=mask & lower)
    tl.store(c_ptr + cj[None, :] * stride_c + ci[:, None], acc, mask=mask & strictly_lower)


# (BLOCK_M, BLOCK_K, num_warps, num_stages) per input dtype size class; the launcher picks by
# the output size; the AOT test compiles every entry for every dtype and layout.
CONFIGS = {
    "small": (64, 32, 4, 3),
    "large": (128, 32, 8, 3),
}
LARGE_OUTPUT = 1024


def choose_config(m_size: int) -> str:
    return "large" if m_size >= LARGE_OUTPUT else "small"


# Split-K rule, from a sweep on an H200 (m in 64-2000, k in 576-14336; every split count, beside
# torch in the same process; experiments/gram_split_sweep.py): about four programs per
# multiprocessor, each over at least 1,024 of k in bf16/fp16 (shorter runs pay the extra launch
# and the sum of the slices for nothing: 0.03 -> 0.05 ms at m <= 400, k = 1536) and 512 in
# float32 (IEEE products: more work per element of k).  Over the sweep this rule's time is 4.4%
# above the best split's (bf16, geometric mean).
PROGRAMS_PER_SM = 4
MIN_K_PER_SPLIT = {torch.float32: 512}
DEFAULT_MIN_K_PER_SPLIT = 1024
_SM_COUNTS: dict = {}


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda" or INTERPRET:
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _SM_COUNTS.get(index)
    if count is None:
        count = _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def choose_split(m_size: int, k_size: int, block_m: int, block_k: int, multiprocessors: int,
                 dtype: torch.dtype = torch.bfloat16):
    """``(splits, k_per_split)``: how many runs of ``k`` the lower tiles are reduced in.

    One split when the lower tiles already fill the device or ``k`` is short; otherwise enough
    to launch about ``PROGRAMS_PER_SM`` programs per multiprocessor, each over at least the
    dtype's ``MIN_K_PER_SPLIT`` of ``k`` (``k_per_split`` a multiple of ``block_k``; no split
    is empty).
    """
    tiles = triton.cdiv(m_size, block_m)
    lower_tiles = tiles * (tiles + 1) // 2
    wanted = triton.cdiv(PROGRAMS_PER_SM * multiprocessors, max(lower_tiles, 1))
    min_k = MIN_K_PER_SPLIT.get(dtype, DEFAULT_MIN_K_PER_SPLIT)
    splits = max(1, min(wanted, k_size // min_k))
    k_per_split = max(triton.cdiv(triton.cdiv(k_size, splits), block_k) * block_k, block_k)
    return triton.cdiv(max(k_size, 1), k_per_split), k_per_split


def gram_triton(x, ridge: float, rows: bool):
    """Launcher with the signature of the op's implementations (see ``gram.py``)."""
    if x.dtype not in SUPPORTED_DTYPES:
        return _op.gram_reference(x, ridge, rows)
    if rows:
        m_size, k_size = x.shape
        stride_m, stride_k = x.stride(0), x.stride(1)
    else:
        k_size, m_size = x.shape
        stride_m, stride_k = x.stride(1), x.stride(0)
    block_m, block_k, warps, stages = CONFIGS[choose_config(m_size)]
    splits, k_per_split = choose_split(m_size, k_size, block_m, block_k,
                                       _multiprocessors(x.device), x.dtype)
    out = torch.empty((splits, m_size, m_size), dtype=torch.float32, device=x.device)
    tiles = triton.cdiv(m_size, block_m)
    _gram_kernel[(tiles, tiles, splits)](
        x, out, m_size, k_size, k_per_split, stride_m, stride_k, m_size, float(ridge),
        BLOCK_M=block_m, BLOCK_K=block_k, UPCAST=INTERPRET and x.dtype != torch.float32,
        IEEE=x.dtype == torch.float32 or INTERPRET, num_warps=warps, num_stages=stages)
    return out[0] if splits == 1 else out.sum(0)


def aot_specs():
    """Every configuration the launcher can launch on a GPU (both layouts, aligned strides)."""
    specs = []
    for dtype in SUPPORTED_DTYPES:
        t = TRITON_DTYPE[dtype]
        for cfg, (block_m, block_k, warps, stages) in CONFIGS.items():
            for layout, unit in (("rows", "stride_k"), ("cols", "stride_m")):
                other = "stride_m" if unit == "stride_k" else "stride_k"
                specs.append(AotSpec(
                    name=f"gram[{t},{cfg},{layout}]", kernel=_gram_kernel,
                    signature={"x_ptr": f"*{t}", "c_ptr": "*fp32", "m_size": "i32",
                               "k_size": "i32", "k_per_split": "i32", other: "i32",
                               "stride_c": "i32",
                               "ridge": "fp32"},
                    constexprs={unit: 1, "BLOCK_M": block_m, "BLOCK_K": block_k,
                                "UPCAST": False, "IEEE": dtype == torch.float32},
                    num_warps=warps, num_stages=stages,
                    divisible=("x_ptr", "c_ptr", "k_per_split", other, "stride_c")))
    return specs


_backends.register_impl(_op.OP, "triton", gram_triton, available=available,
                        auto_priority=10, auto_ok=auto_ok)

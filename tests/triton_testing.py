"""Shared by the Triton kernel tests: when they can run, where, and the one tolerance table.

The kernels run on a CUDA device, or on the CPU under ``TRITON_INTERPRET=1`` (exported before
Python starts; CI does).  Errors are relative Frobenius errors against a float64 reference of
the *same rounded inputs* (``tolerances.rel_err``), so the table bounds the kernels' own
arithmetic.
"""
import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()

requires_kernels = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRET or HAS_CUDA),
    reason=("triton is not installed" if not HAS_TRITON else
            "no CUDA device and TRITON_INTERPRET is not set (export TRITON_INTERPRET=1 "
            "before Python starts to run the kernels on the CPU)"))

DEVICE = torch.device("cuda" if HAS_CUDA and not INTERPRET else "cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------- the tolerance table
# relative Frobenius error vs float64 on the same rounded inputs, per op and input dtype.
# All arithmetic is float32 (float64 for the statistics' merges) whatever the input dtype,
# so the bounds are float32-level for every dtype; they are ~10x the errors measured
# under the interpreter on the test shapes.
TOLERANCES = {
    "pseudo_values": {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6},
    "stats_mean": {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6},
    "stats_m2": {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6},
    # gram: err <= GRAM_FACTOR * err(torch.matmul in float32) + floor[dtype]
    "gram_floor": {torch.float32: 2e-7, torch.bfloat16: 2e-7, torch.float16: 2e-7},
    # on a GPU, bf16/fp16 tiles go to tensor cores (products exact, float32 accumulate), and
    # float32 uses input_precision="ieee": float32-level everywhere, a little looser for the
    # different accumulation order of larger tiles
    "gpu": {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5},
}
GRAM_FACTOR = 2.0
PARAM_SHIFT_RTOL = 1e-5   # param_shift with the triton backend vs float64


def use_backend(monkeypatch, name):
    monkeypatch.setenv("ULTRAEDIT_BACKEND", name)


def odd_features(n, d_in, d_out, seed, dtype=torch.float32, device=None):
    """Non-zero keys with an offset (||k||² ~ d_in) and ~1e-3 gradients, odd shapes."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_in, generator=gen) * 0.9 + torch.linspace(-0.5, 1.5, d_in)
    grads = (torch.randn(n, d_out, generator=gen) + 0.3) * 1e-3
    device = device or DEVICE
    return keys.to(device=device, dtype=dtype), grads.to(device=device, dtype=dtype)

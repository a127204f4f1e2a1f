"""Shared by the Triton kernel tests: when they can run, where, and their inputs.

The kernels run on a CUDA device, or on the CPU under ``TRITON_INTERPRET=1`` (exported before
Python starts; CI does).  Tolerances: ``tests/tolerances.py`` (one table, one rule).
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

def use_backend(monkeypatch, name):
    monkeypatch.setenv("ULTRAEDIT_BACKEND", name)


def odd_features(n, d_in, d_out, seed, dtype=torch.float32, device=None):
    """Non-zero keys with an offset (||k||² ~ d_in) and ~1e-3 gradients, odd shapes."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_in, generator=gen) * 0.9 + torch.linspace(-0.5, 1.5, d_in)
    grads = (torch.randn(n, d_out, generator=gen) + 0.3) * 1e-3
    device = device or DEVICE
    return keys.to(device=device, dtype=dtype), grads.to(device=device, dtype=dtype)

"""Benchmark: ``spd_factor`` + ``spd_solve_factored`` (factor once, solve per step) against the
plain-torch composition a user would write (``cholesky_ex`` + ``cholesky_solve``), and against
factoring on every step with ``spd_solve``.

    PYTHONPATH=.:python pytest bench/bench_spd_factor.py --benchmark-columns=median,iqr,rounds

Cases: the key-memory systems of a turn, n = d_in in {576, 1536, 4096} with N = 100 or 400
right-hand sides, 12 steps per turn (the embedded preset's ``steps``). Each ``extra_info`` has
the ratio of the plain-torch median measured before it in the same run.
"""
from __future__ import annotations

import pytest
import torch

import ultraedit_kernels as uk

STEPS = 12
CASES = [(576, 100), (1536, 100), (1536, 400),
         pytest.param(4096, 400, marks=pytest.mark.heavy)]
_PLAIN = {}


def _system(n, k):
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(n, n + 8, generator=gen, dtype=torch.float64)
    a = x @ x.T / n + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, k, generator=gen, dtype=torch.float64)
    return a, b


def _plain(a, b):
    factor, _ = torch.linalg.cholesky_ex(a)
    return [torch.cholesky_solve(b, factor) for _ in range(STEPS)]


def _ours(a, b):
    factor, _ = uk.spd_factor(a)
    return [uk.spd_solve_factored(factor, b) for _ in range(STEPS)]


def _refactor_every_step(a, b):
    return [uk.spd_solve(a, b)[0] for _ in range(STEPS)]


@pytest.mark.parametrize("impl", ["plain", "ours", "refactor_every_step"])
@pytest.mark.parametrize("n,k", CASES)
def test_factor_once_solve_per_step(benchmark, n, k, impl):
    a, b = _system(n, k)
    fn = {"plain": _plain, "ours": _ours, "refactor_every_step": _refactor_every_step}[impl]
    benchmark.pedantic(fn, args=(a, b), rounds=5, warmup_rounds=1)
    median = benchmark.stats.stats.median
    if impl == "plain":
        _PLAIN[(n, k)] = median
    elif (n, k) in _PLAIN:
        benchmark.extra_info["plain_over_this"] = _PLAIN[(n, k)] / median
    benchmark.extra_info.update(n=n, k=k, steps=STEPS, threads=torch.get_num_threads())

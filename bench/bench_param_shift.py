"""param_shift(method="auto") against the paper's primal float32 solve, same process.

The paper's computation: ``torch.linalg.solve(KᵀK + I, KᵀV)`` in float32 (a d_in x d_in
system).  Ours: the dual Cholesky solve ``Kᵀ (KKᵀ + I)⁻¹ V``.  Both are compared with a
float64 evaluation of the same formula.

Run as a script (writes JSON)::

    python bench/bench_param_shift.py --n 400 --d-in 4096 --d-out 4096 --repeats 5 \
        --json bench/out/param_shift.json

or through pytest-benchmark: ``python -m pytest bench/bench_param_shift.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ultraedit_kernels as uk  # noqa: E402


def make_case(n, d_in, d_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(d_in, generator=g) * 0.5
    keys = torch.randn(n, d_in, generator=g) * (1000.0 / d_in) ** 0.5 + 0.3 * offset
    grads = torch.randn(n, d_out, generator=g) * 1e-3
    stats = uk.RunningStats(d_in + d_out).update(torch.cat([keys, grads], 1))
    return keys, grads, stats


def paper_primal(keys, grads, stats, lr=1e-6):
    values = uk.pseudo_values(keys, grads, stats, lr)
    eye = torch.eye(keys.shape[1])
    return torch.linalg.solve(keys.T @ keys + eye, keys.T @ values)


def fp64_reference(keys, grads, stats, lr=1e-6):
    values = uk.pseudo_values(keys, grads, stats, lr).double()
    k = keys.double()
    return torch.linalg.solve(k.T @ k + torch.eye(k.shape[1], dtype=torch.float64), k.T @ values)


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def rel_err(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


def run(n=400, d_in=4096, d_out=4096, repeats=5):
    keys, grads, stats = make_case(n, d_in, d_out)
    ref = fp64_reference(keys, grads, stats)
    ours = uk.param_shift(keys, grads, stats, method="auto")
    paper = paper_primal(keys, grads, stats)
    t_ours, all_ours = _median_time(lambda: uk.param_shift(keys, grads, stats, method="auto"), repeats)
    t_paper, all_paper = _median_time(lambda: paper_primal(keys, grads, stats), repeats)
    return {
        "shape": {"n": n, "d_in": d_in, "d_out": d_out},
        "machine": {"cpu": _cpu_name(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "method": uk.choose_method(n, d_in),
        "median_s": {"ours": t_ours, "paper_primal_fp32": t_paper},
        "times_s": {"ours": all_ours, "paper_primal_fp32": all_paper},
        "speedup": t_paper / t_ours,
        "rel_err_vs_fp64": {"ours": rel_err(ours, ref), "paper_primal_fp32": rel_err(paper, ref)},
        "accuracy_gain": rel_err(paper, ref) / max(rel_err(ours, ref), 1e-300),
    }


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor()


def test_param_shift_vs_paper(benchmark):
    keys, grads, stats = make_case(400, 1024, 1024)
    benchmark.extra_info.update(run(400, 1024, 1024, repeats=3))
    benchmark(lambda: uk.param_shift(keys, grads, stats, method="auto"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--d-in", type=int, default=4096)
    p.add_argument("--d-out", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    result = run(a.n, a.d_in, a.d_out, a.repeats)
    print(json.dumps(result, indent=2))
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

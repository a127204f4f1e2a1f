"""The vocabulary projection of a turn's answer rows: its speed against the number of rows.

A turn of the paper's settings projects ~17 answer rows per micro-batch of 10 requests to the
embedded model's 49152-token vocabulary (weight 49152 x 576), forward ``X Wᵀ`` and backward
``dY W``. This times both, and the cross-entropy between them, at 17, 34 and 170 rows (one,
two and ten micro-batches' rows in one product), float32, median of ``--rounds``, and reports
the FLOP rate and the time per row; it also checks that the first rows of one product equal
a product of only those rows (the smallest count of ``--rows``), bit for bit, forward and
backward (``rows_independent``: what makes ``backward_group`` bit-identical on this BLAS).

    PYTHONPATH=python python experiments/head_rows.py --threads 1 --json experiments/results/head_rows.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def _median(fn, rounds):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--rows", type=int, nargs="+", default=[17, 34, 170])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(a.vocab, a.hidden, generator=gen) * 0.02
    out = {"vocab": a.vocab, "hidden": a.hidden, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "rows": {}}
    for m in a.rows:
        x = torch.randn(m, a.hidden, generator=gen)
        dy = torch.randn(m, a.vocab, generator=gen) * 1e-3
        y = torch.randint(0, a.vocab, (m,), generator=gen)
        logits = x @ w.T
        fwd = _median(lambda: x @ w.T, a.rounds)
        bwd = _median(lambda: dy @ w, a.rounds)
        ce = _median(lambda: F.cross_entropy(logits, y), a.rounds)
        flops = 2 * m * a.vocab * a.hidden
        sub = min(a.rows)
        out["rows"][m] = {
            "forward_s": fwd, "backward_s": bwd, "cross_entropy_s": ce,
            "forward_gflops": flops / fwd / 1e9, "backward_gflops": flops / bwd / 1e9,
            "forward_per_row_ms": fwd / m * 1e3, "backward_per_row_ms": bwd / m * 1e3,
            "rows_independent": bool(torch.equal(logits[:sub], x[:sub] @ w.T)
                                     and torch.equal((dy @ w)[:sub], dy[:sub] @ w)),
        }
        r = out["rows"][m]
        print(f"{m:4d} rows: forward {fwd * 1e3:7.1f} ms ({r['forward_gflops']:5.1f} GFLOP/s), "
              f"backward {bwd * 1e3:7.1f} ms ({r['backward_gflops']:5.1f} GFLOP/s), "
              f"cross-entropy {ce * 1e3:5.1f} ms, rows independent: {r['rows_independent']}",
              flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

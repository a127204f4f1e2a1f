"""One lifelong-preset turn alone, float32 against bfloat16 products: alternating rounds and one
``torch.profiler`` profile of each, summed by kind of op.

Each round edits the same 100 requests (the first turn of the README's 1,000 records) with
``smollm2-135m-lifelong`` and rolls the turn back, so every round starts from the same weights
and state; the products' dtype is switched between rounds (``EditConfig.matmul_dtype``). The
profile sums each op's self CPU time into: linear products (``mm``/``addmm``/``linear``/...,
the oneDNN bfloat16 ones included), casts (``to``/``copy_``), attention, and the rest.

    gunzip -c experiments/results/run_offline_records.jsonl.gz > records.jsonl
    python experiments/bf16_turn_profile.py --records records.jsonl --threads 1 \\
        --json experiments/results/bf16_turn_profile_xeon.json
"""
import dataclasses
import statistics
import sys
import time

import _common

import torch
from torch.profiler import ProfilerActivity, profile

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")   # and every "*linear*" op
CASTS = ("aten::to", "aten::_to_copy", "aten::copy_")


def kind(name: str) -> str:
    if name in PRODUCTS or "linear" in name:
        return "products"
    if name in CASTS:
        return "casts"
    if "attention" in name or "sdpa" in name or "softmax" in name:
        return "attention and softmax"
    return "the rest"


def main(argv=None) -> int:
    args = _common.rounds_parser(__doc__).parse_args(argv)
    torch.set_num_threads(args.threads)
    editor, requests = _common.lifelong_turn(args)
    base = editor.config

    def turn(dtype: str):
        editor.config = dataclasses.replace(base, matmul_dtype=dtype)
        report = editor.edit(requests)
        editor.rollback()
        return report

    for dtype in ("model", "bfloat16"):   # warm-up: allocator, oneDNN's first bfloat16 calls
        turn(dtype)
    rounds = {"model": [], "bfloat16": []}
    for r in range(args.rounds):
        for dtype in (("model", "bfloat16") if r % 2 == 0 else ("bfloat16", "model")):
            rep = turn(dtype)
            rounds[dtype].append({"turn_s": rep.turn_s, "fwd_bwd_s": rep.fwd_bwd_s,
                                  "steps_run": rep.steps_run, "n_predicted": rep.n_predicted})
            print(f"round {r} {dtype}: turn {rep.turn_s:.2f} s, forward+backward "
                  f"{rep.fwd_bwd_s:.2f} s", file=sys.stderr)

    profiles = {}
    for dtype in ("model", "bfloat16"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            turn(dtype)
            wall = time.perf_counter() - t0
        by_kind, top = {}, []
        for ev in prof.key_averages():
            by_kind[kind(ev.key)] = by_kind.get(kind(ev.key), 0.0) + ev.self_cpu_time_total / 1e6
            top.append((ev.self_cpu_time_total / 1e6, ev.key, ev.count))
        top.sort(reverse=True)
        profiles[dtype] = {"wall_s": wall, "self_s_by_kind": by_kind,
                           "top_ops": [{"op": k, "self_s": s, "calls": c} for s, k, c in top[:15]]}
        print(dtype, {k: round(v, 2) for k, v in by_kind.items()}, file=sys.stderr)

    med = {d: {k: statistics.median(x[k] for x in rows) for k in ("turn_s", "fwd_bwd_s")}
           for d, rows in rounds.items()}
    out = {"command": " ".join(sys.argv), "threads": args.threads, "edits": len(requests),
           "rounds": rounds, "median": med,
           "speedup": {k: med["model"][k] / med["bfloat16"][k] for k in ("turn_s", "fwd_bwd_s")},
           "profiles": profiles}
    _common.report(out, args.json, ("median", "speedup"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

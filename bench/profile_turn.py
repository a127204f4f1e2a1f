"""Profile one UltraEdit turn with ``torch.profiler`` and write a Chrome trace.

    PYTHONPATH=.:python python bench/profile_turn.py                       # embedded model turn
    PYTHONPATH=.:python python bench/profile_turn.py --mode module --d-in 4096 --d-out 14336
    PYTHONPATH=.:python python bench/profile_turn.py --paper               # the paper path too

Open the trace (default ``bench/out/trace_turn.json``) in ``chrome://tracing`` or
https://ui.perfetto.dev. The editor's stages appear as named ranges (``ultraedit/...``) when
the editor wraps them with ``ultraedit_kernels._profiling.nvtx_range``: that helper opens a
``torch.profiler.record_function`` whenever a profiler is active. On a GPU the trace also holds
the CUDA kernels (``--cuda`` is implied when a GPU is present).

``--mode module`` profiles one module's update (stats, shift factors, in-place apply) on random
features at the given shape, without a model; ``--paper`` adds the paper path's turn (or module
update) to the same trace, after ours, under a ``paper/`` range.
"""
from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE), os.path.join(os.path.dirname(_HERE), "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import paper_baseline as paper  # noqa: E402
from ultraedit_kernels._profiling import nvtx_range  # noqa: E402


def _module_work(args, device):
    from ultraedit_kernels import RunningStats, apply_shift_, shift_factors
    from _common import random_features

    keys, grads, parts = random_features(args.n, args.d_in, args.d_out, device, seed=1)
    weight = torch.randn(args.d_out, args.d_in, device=device) * 0.02
    stats = RunningStats(args.d_in + args.d_out, device=device)

    def ours():
        with nvtx_range("ultraedit/stats"):
            stats.update(torch.cat([keys, grads], 1))
        with nvtx_range("ultraedit/shift_factors"):
            factors = shift_factors(keys, grads, stats, lr=1e-6, ridge=1.0)
        with nvtx_range("ultraedit/apply"):
            apply_shift_(weight, keys, factors, layout="linear")

    normalizer = paper.RunningMeanStd(args.d_in + args.d_out, device=device)
    weight_paper = weight.clone()

    def theirs():
        with paper.FeatureCache() as cache:
            paper.module_update(weight_paper, parts, normalizer, cache)

    return ours, theirs


def _turn_work(args, device):
    from ultraedit import UltraEditor
    from ultraedit.data import offline_facts
    from ultraedit.models import load_model
    from ultraedit.tokenization import encode_edit_batch

    model, tok = load_model("default")
    requests = [r.as_request() for r in offline_facts(("capital",), limit=args.edits)]
    editor = UltraEditor(model, tok, micro_batch=args.micro_batch, positions="answer", steps=1,
                         hold_done=False, memory=0.0, preserve=0.0)  # the paper's per-turn computation
    editor.edit(requests)                     # first turn: creates the statistics (not profiled)

    def ours():
        report = editor.edit(requests)
        print(f"turn: {report.turn_s:.3f} s, fwd+bwd {report.fwd_bwd_s:.3f} s, "
              f"editor {report.editor_s:.3f} s", file=sys.stderr)

    theirs = None
    if args.paper:
        model_paper, _ = load_model("default")
        baseline = paper.PaperTurn(model_paper, list(editor.modules), lr=editor.lr, lam=editor.ridge)

        def theirs():
            batches = [encode_edit_batch(tok, [r["prompt"] for r in requests[i:i + args.micro_batch]],
                                         [r["target"] for r in requests[i:i + args.micro_batch]])
                       for i in range(0, len(requests), args.micro_batch)]
            baseline.turn(batches)
    return ours, theirs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("turn", "module"), default="turn")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--micro-batch", type=int, default=10)
    parser.add_argument("--n", type=int, default=400, help="rows (module mode)")
    parser.add_argument("--d-in", type=int, default=4096)
    parser.add_argument("--d-out", type=int, default=14336)
    parser.add_argument("--paper", action="store_true", help="also profile the paper path")
    parser.add_argument("--memory", action="store_true", help="record allocations (profile_memory)")
    parser.add_argument("--stack", action="store_true", help="record Python stacks (slower)")
    parser.add_argument("--out", default=os.path.join(_HERE, "out", "trace_turn.json"))
    parser.add_argument("--top", type=int, default=25, help="rows of the summary table")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ours, theirs = (_module_work if args.mode == "module" else _turn_work)(args, device)
    ours()                                     # warm-up outside the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True, profile_memory=args.memory,
                 with_stack=args.stack) as prof:
        with nvtx_range("ultraedit/turn"):       # record_function here; NVTX with ULTRAEDIT_NVTX=1
            ours()
        if theirs is not None:
            with nvtx_range("paper/turn"):
                theirs()
        if device.type == "cuda":
            torch.cuda.synchronize()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    prof.export_chrome_trace(args.out)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
    ranges = [e for e in prof.key_averages() if e.key.startswith(("ultraedit/", "paper/"))]
    if ranges:
        print("named ranges (total CPU time, ms):")
        for e in sorted(ranges, key=lambda e: e.key):
            print(f"  {e.key:32s} {e.cpu_time_total / 1e3:10.2f}  x{e.count}")
    print(f"Chrome trace written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

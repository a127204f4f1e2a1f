"""The lifelong preset's turn against the paper's turn on the same edits, in one process:
alternating rounds, medians, and the ratio the quality goal bounds (a turn at most 2x the
paper-settings turn).

One embedded model, three editors on it, each turn rolled back so every round starts from the
same weights: the paper's settings (``--preset official --modules paper``: ``EditConfig.official``
on the paper's modules for the architecture, float32), and ``smollm2-135m-lifelong`` with float32
and with bfloat16 products. Each round runs the three in a rotated order on the first
``--edits`` records. The process keeps freed host memory first
(``ultraedit.host_allocator.keep_freed_memory``), as the ``ultraedit`` command does.

    gunzip -c experiments/results/run_offline_records.jsonl.gz > records.jsonl
    python experiments/paper_turn_ratio.py --records records.jsonl --threads 1 \\
        --json experiments/results/paper_turn_ratio_xeon.json

``--edit-wordings question`` hands every editor the records' rewrite prompts asked as questions
(``ultraedit.eval.edit_requests``; the records need questions, e.g. the report split's saved by
``ultraedit run --data offline --split report --records-out FILE``), ``--editors`` keeps
some of the three, and ``--presets A.json,B.json`` adds an editor per preset file (named by the
file, with bfloat16 products), e.g. the output of ``ultraedit tune``.
"""
import os
import statistics
import sys

import _common


def main(argv=None) -> int:
    parser = _common.rounds_parser(__doc__)
    parser.add_argument("--edit-wordings", default="prompt", choices=("prompt", "question", "both"))
    parser.add_argument("--editors", default="paper,lifelong,lifelong_bf16")
    parser.add_argument("--presets", default="", metavar="A.json,B.json")
    args = parser.parse_args(argv)
    names = [name for name in ("paper", "lifelong", "lifelong_bf16")
             if name in args.editors.split(",")]
    if not names or names[0] != "paper":     # checked before the model loads
        parser.error("--editors must keep paper: the ratios are against its turn")
    files = {os.path.splitext(os.path.basename(f))[0] + "_bf16": f
             for f in args.presets.split(",") if f}
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if missing:
        parser.error(f"--presets: no such file {missing}")
    names += list(files)
    from ultraedit.host_allocator import keep_freed_memory

    allocator = keep_freed_memory()
    import torch
    from ultraedit import EditConfig, UltraEditor
    from ultraedit.data import load_records
    from ultraedit.eval import edit_requests
    from ultraedit.models import load_model
    from ultraedit.modules import paper_module_names

    torch.set_num_threads(args.threads)
    model, tok = load_model("default")
    requests = [q for r in load_records(args.records, format="records", limit=args.edits)
                for q in edit_requests(r, args.edit_wordings)]
    configs = {
        "paper": lambda: EditConfig.official(modules=paper_module_names(model)),
        "lifelong": lambda: EditConfig.from_preset("smollm2-135m-lifelong"),
        "lifelong_bf16": lambda: EditConfig.from_preset("smollm2-135m-lifelong",
                                                        matmul_dtype="bfloat16"),
    }
    for name, path in files.items():
        configs[name] = (lambda path=path: EditConfig.from_preset(path, matmul_dtype="bfloat16"))
    editors = {name: UltraEditor(model, tok, configs[name]()) for name in names}

    def turn(name):
        report = editors[name].edit(requests)
        editors[name].rollback()
        return {"turn_s": report.turn_s, "fwd_bwd_s": report.fwd_bwd_s,
                "steps_run": report.steps_run}

    for name in names:      # warm-up: oneDNN's first calls, the allocator's first blocks
        turn(name)
    rounds = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rounds[name].append(turn(name))
            print(f"round {r} {name}: turn {rounds[name][-1]['turn_s']:.2f} s", file=sys.stderr)
    median = {name: statistics.median(row["turn_s"] for row in rounds[name]) for name in names}
    out = {"command": "experiments/paper_turn_ratio.py " + " ".join(argv or sys.argv[1:]),
           "threads": args.threads, "edits": len(requests), "host_allocator": allocator,
           "edit_wordings": args.edit_wordings,
           "paper_modules": paper_module_names(model), "rounds": rounds, "median": median,
           "over_paper": {name: median[name] / median["paper"] for name in names[1:]}}
    _common.report(out, args.json, ("median", "over_paper"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

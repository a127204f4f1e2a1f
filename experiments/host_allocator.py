"""glibc's malloc as it comes against keeping freed memory in the process
(``ultraedit.host_allocator.keep_freed_memory``): one lifelong-preset turn and one decoding pass,
in alternating processes.

An allocator's settings cannot be undone inside a process, so every round starts two child
processes, one per variant, in alternating order: ``system`` (``ULTRAEDIT_KEEP_FREED_MEMORY=0``,
glibc's defaults) and ``kept`` (``keep_freed_memory()`` before anything else). Each child loads
the embedded model, edits the first ``--edits`` records with ``smollm2-135m-lifelong`` (one
warm-up turn, then ``--turns`` timed turns, each rolled back), records each turn's time, minor
page faults and system CPU time and a SHA-256 of the edited weights after its first timed turn,
then times ``decode_answers`` on the records' WILD-style prompts. The parent reports medians,
the speed-up of ``kept`` over ``system`` and whether the edited weights and the decoded answers
are the same in every child.

    gunzip -c experiments/results/run_offline_records.jsonl.gz > records.jsonl
    python experiments/host_allocator.py --records records.jsonl --threads 1 \\
        [--matmul-dtype bfloat16] --json experiments/results/host_allocator_{fp32,bf16}_xeon.json
"""
import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import _common

VARIANTS = ("system", "kept")


def child(args) -> dict:
    from ultraedit.host_allocator import OPT_OUT, keep_freed_memory

    if args.child == "system":
        os.environ[OPT_OUT] = "0"
    allocator = keep_freed_memory()
    import torch
    from ultraedit.data import load_records
    from ultraedit.eval.wild import decode_answers, wild_prompt
    from ultraedit.serialization import tensor_sha256

    torch.set_num_threads(args.threads)
    editor, requests = _common.lifelong_turn(args, matmul_dtype=args.matmul_dtype)
    editor.edit(requests)          # warm-up: oneDNN's first calls, the allocator's first blocks
    editor.rollback()
    turns, digest = [], None
    for t in range(args.turns):
        before = resource.getrusage(resource.RUSAGE_SELF)
        report = editor.edit(requests)
        after = resource.getrusage(resource.RUSAGE_SELF)
        if t == 0:   # one digest of every parameter's
            digest = hashlib.sha256("".join(
                tensor_sha256(p) for p in editor.model.parameters()).encode()).hexdigest()
        editor.rollback()
        turns.append({"turn_s": report.turn_s, "fwd_bwd_s": report.fwd_bwd_s,
                      "minor_faults": after.ru_minflt - before.ru_minflt,
                      "sys_s": after.ru_stime - before.ru_stime})
    records = load_records(args.records, format="records", limit=args.prompts)
    prompts = [wild_prompt(r.prompt, r.questions) for r in records]
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    answers = decode_answers(editor.model, editor.tokenizer, prompts)
    decode_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"variant": args.child, "allocator": allocator, "turns": turns,
            "turn_s": statistics.median(t["turn_s"] for t in turns), "weights_sha256": digest,
            "decode_s": decode_s, "decode_minor_faults": after.ru_minflt - before.ru_minflt,
            "answers_sha256": hashlib.sha256("\n".join(answers).encode()).hexdigest(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv=None) -> int:
    p = _common.rounds_parser(__doc__)
    p.add_argument("--turns", type=int, default=2, help="timed turns per child")
    p.add_argument("--prompts", type=int, default=300, help="records whose prompts are decoded")
    p.add_argument("--matmul-dtype", default="model", choices=("model", "bfloat16"))
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)   # one variant's process
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rounds = {v: [] for v in VARIANTS}
    passed = list(argv if argv is not None else sys.argv[1:])
    for r in range(args.rounds):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            with tempfile.TemporaryFile("w+") as out:
                subprocess.run([sys.executable, os.path.abspath(__file__), *passed, "--child", v],
                               stdout=out, check=True)
                out.seek(0)
                row = json.loads(out.read().strip().splitlines()[-1])
            rounds[v].append(row)
            print(f"round {r} {v}: turn {row['turn_s']:.2f} s, decode {row['decode_s']:.2f} s, "
                  f"faults per turn {row['turns'][0]['minor_faults']}", file=sys.stderr)
    median = {v: {k: statistics.median(row[k] for row in rounds[v])
                  for k in ("turn_s", "decode_s", "peak_rss_bytes")} for v in VARIANTS}
    rows = [row for v in VARIANTS for row in rounds[v]]
    out = {"command": "experiments/host_allocator.py " + " ".join(passed),
           "threads": args.threads, "matmul_dtype": args.matmul_dtype, "rounds": rounds,
           "median": median,
           "speedup": {k: median["system"][k] / median["kept"][k]
                       for k in ("turn_s", "decode_s")},
           "weights_bit_identical": len({row["weights_sha256"] for row in rows}) == 1,
           "answers_identical": len({row["answers_sha256"] for row in rows}) == 1}
    _common.report(out, args.json, ("median", "speedup", "weights_bit_identical",
                                    "answers_identical"))
    return 0 if out["weights_bit_identical"] and out["answers_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())

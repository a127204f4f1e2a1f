"""The WILD-style parts of a run's evaluation at fixed 32-prompt decoding batches against the
KV-cache-sized default (``ultraedit.eval.decode_batch_size``), in alternating rounds on the
unedited embedded model: the true facts with WILD-style scores, the WILD-style locality
reference and the WILD-style evaluation of the first ``--records`` of the README's 1,000
records. The scores must agree (the same token ids at every batch size).

    PYTHONPATH=python python experiments/wild_decode_batches.py --records 150 --rounds 2 \\
        --json experiments/results/wild_decode_batches.json

``--sweep 32,64,128,256`` instead times ``decode_answers`` alone at those batch sizes on the
rewrite, paraphrase and locality prompts of the first records (``--prompts``, default 512),
two rounds, and checks that every size gives the same token ids; ``--edited N`` first edits
the first N records with the preset (turns of 50) and decodes the WILD-style prompts of the
first 300 records, one round:

    PYTHONPATH=python python experiments/wild_decode_batches.py --sweep 32,64,128,256 \\
        --json experiments/results/wild_decode_batches_sweep.json
    PYTHONPATH=python python experiments/wild_decode_batches.py --sweep 32,256 --edited 100 \\
        --json experiments/results/wild_decode_batches_edited.json
"""
import argparse
import gzip
import json
import os
import statistics
import tempfile
import time

import _common  # noqa: F401  (the repository on sys.path)
import torch

from ultraedit.data import load_records
from ultraedit.eval import (decode_batch_size, locality_reference, true_fact_scores,
                            wild_evaluation)
from ultraedit.models import load_model

RECORDS = os.path.join(_common.ROOT, "experiments", "results", "run_offline_records.jsonl.gz")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sweep", help="comma-separated batch sizes of decode_answers alone")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--edited", type=int, default=0,
                    help="--sweep on the model after editing the first N records")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model("default")
    if a.sweep:
        return sweep(model, tok, [int(x) for x in a.sweep.split(",")], a.prompts, a.json,
                     a.edited)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.jsonl")
        with gzip.open(RECORDS, "rt") as src, open(path, "w") as dst:
            for _, line in zip(range(a.records), src):
                dst.write(line)
        records = load_records(path, "records")

    def job(batch_size):
        t0 = time.perf_counter()
        true = true_fact_scores(model, tok, records, wild=True, batch_size=batch_size)
        t1 = time.perf_counter()
        ref = locality_reference(model, tok, records, wild=True, batch_size=batch_size)
        t2 = time.perf_counter()
        wild = wild_evaluation(model, tok, records, ref, batch_size=batch_size)
        t3 = time.perf_counter()
        scores = {**{f"true_{k}": v for k, v in true.items() if isinstance(v, float)},
                  **{k: v for k, v in wild.items() if isinstance(v, float)}}
        return {"true_facts_s": t1 - t0, "wild_reference_s": t2 - t1, "wild_s": t3 - t2}, scores

    arms = {"32": 32, "auto": None}
    times = {k: [] for k in arms}
    scores = {}
    for r in range(a.rounds):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            t, s = job(arms[name])
            times[name].append(t)
            scores.setdefault(name, s)
            print(f"round {r} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()),
                  flush=True)
    total = {k: [sum(t.values()) for t in v] for k, v in times.items()}
    paired = [a32 / auto for a32, auto in zip(total["32"], total["auto"])]
    wild_paired = [x["wild_s"] / y["wild_s"] for x, y in zip(times["32"], times["auto"])]
    out = {"command": "experiments/wild_decode_batches.py", "records": a.records,
           "threads": a.threads, "auto_rows": decode_batch_size(model, 30), "times_s": times,
           "total_median_s": {k: statistics.median(v) for k, v in total.items()},
           "speed_paired_total": paired, "speed_paired_wild": wild_paired,
           "scores_equal": scores["32"] == scores["auto"], "scores": scores["auto"]}
    print(f"total {statistics.median(paired):.2f}x, WILD-style evaluation "
          f"{statistics.median(wild_paired):.2f}x faster; scores equal: {out['scores_equal']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


def sweep(model, tok, sizes, n_prompts, json_path, edited=0):
    from ultraedit import UltraEditor
    from ultraedit.eval import decode_answers
    from ultraedit.eval.scores import _wild_prompts

    if edited:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "records.jsonl")
            with gzip.open(RECORDS, "rt") as src, open(path, "w") as dst:
                for _, line in zip(range(max(300, edited)), src):
                    dst.write(line)
            records = load_records(path, "records")
        editor = UltraEditor(model, tok)
        for start in range(0, edited, 50):
            editor.edit([r.as_request() for r in records[start:min(edited, start + 50)]])
        prompts = _wild_prompts(records[:300], object())   # every WILD prompt, locality too
    else:
        prompts = []
        with gzip.open(RECORDS, "rt") as src:
            for line in src:
                r = json.loads(line)
                prompts += [r["prompt"], *r["paraphrases"],
                            *(lp["prompt"] for lp in r["locality"])]
                if len(prompts) >= n_prompts:
                    break
        prompts = prompts[:n_prompts]
    times = {str(b): [] for b in sizes}
    first, same = None, True
    for r in range(1 if edited else 2):
        for b in (sizes if r % 2 == 0 else sizes[::-1]):
            t0 = time.perf_counter()
            _, ids = decode_answers(model, tok, prompts, batch_size=b, return_ids=True)
            times[str(b)].append(time.perf_counter() - t0)
            first = ids if first is None else first
            same = same and ids == first
            print(f"round {r} batch {b}: {times[str(b)][-1]:.1f} s", flush=True)
    out = {"command": "experiments/wild_decode_batches.py --sweep", "prompts": len(prompts),
           "edited": edited, "times_s": times, "same_ids": same}
    print(json.dumps(out))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

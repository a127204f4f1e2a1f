"""Measure edit quality of candidate defaults on the embedded model (the tables in experiments/tuning.md).

Protocol = the demo's (2 lifelong turns of 50 counterfactual edits, micro-batches of 10,
teacher-forced ES/GS/LS against the unedited model) but on TUNING facts that the demo's reported
numbers never use: the ``city_country`` relation (cities, so no subject is shared with the
demo's countries) with seed 1. The winning setting is then checked, unchanged, by
``ultraedit demo`` on its own facts (capital + language, seed 0).

    python experiments/editor_tuning.py --json /tmp/tuning.json
"""

import argparse
import json
import os
import sys
import time

from _common import run_demo  # noqa: E402  (puts the repository on sys.path)
import torch  # noqa: E402

from ultraedit.eval import demo_records  # noqa: E402
from ultraedit.data.records import EditRecord  # noqa: E402
from ultraedit.models import load_model  # noqa: E402


def down(a, b):
    return [f"model.layers.{i}.mlp.down_proj" for i in range(a, b + 1)]


def paper_llama_30():
    # the paper's LLaMA-3 choice (gate 11-15, up 18-24 of 32 layers) mapped to 30 layers
    return ([f"model.layers.{i}.mlp.gate_proj" for i in range(10, 15)]
            + [f"model.layers.{i}.mlp.up_proj" for i in range(17, 23)])


CONFIGS = [
    ("down_proj 22-28", down(22, 28), 1e-4),
    ("down_proj 22-28", down(22, 28), 3e-4),
    ("down_proj 22-28", down(22, 28), 1e-3),
    ("down_proj 24-28", down(24, 28), 3e-4),
    ("down_proj 22-28", down(22, 28), 2e-4),
    ("gate 10-14 + up 17-22 (paper, mapped)", paper_llama_30(), 3e-5),
    ("gate 10-14 + up 17-22 (paper, mapped)", paper_llama_30(), 6e-5),
    ("gate 10-14 + up 17-22 (paper, mapped)", paper_llama_30(), 1e-6),
    ("down_proj 24-28", down(24, 28), 2e-4),
    ("down_proj 26-28", down(26, 28), 5e-4),
    ("down_proj 22-28", down(22, 28), 1.5e-4),
    ("down_proj 24-28", down(24, 28), 2.5e-4),
    # 12+: the memory-free options (protect_mean = α of the mean-key row, steps per turn);
    # every row passes both explicitly (the embedded defaults may change)
]
BASE = {"protect_mean": 0.0, "steps": 1}
CONFIGS = [c + (dict(BASE),) for c in CONFIGS]
EXTRA = [
    # (label, modules, lr, protect_mean, steps)
    ("down_proj 24-28", down(24, 28), 2.5e-4, 1.0, 1),   # 12
    ("down_proj 24-28", down(24, 28), 2.5e-4, 4.0, 1),   # 13
    ("down_proj 24-28", down(24, 28), 5e-4, 4.0, 1),     # 14
    ("down_proj 24-28", down(24, 28), 1.5e-4, 0.0, 2),   # 15
    ("down_proj 24-28", down(24, 28), 1.5e-4, 4.0, 2),   # 16
    ("down_proj 22-28", down(22, 28), 3e-4, 4.0, 1),     # 17
    ("down_proj 24-28", down(24, 28), 1e-4, 4.0, 3),     # 18
    ("down_proj 24-28", down(24, 28), 1e-3, 16.0, 1),    # 19
    ("down_proj 24-28", down(24, 28), 5e-4, 16.0, 1),    # 20
    ("down_proj 22-28", down(22, 28), 2e-4, 4.0, 2),     # 21
    ("down_proj 24-28", down(24, 28), 2e-4, 16.0, 2),    # 22
    ("down_proj 24-28", down(24, 28), 1e-4, 0.0, 3),     # 23
    ("down_proj 24-28", down(24, 28), 2e-4, 4.0, 2),     # 24
    ("down_proj 24-28", down(24, 28), 1.5e-4, 16.0, 3),  # 25
    ("down_proj 24-28", down(24, 28), 2.5e-4, 4.0, 2),   # 26
    ("down_proj 22-28", down(22, 28), 1.5e-4, 4.0, 2),   # 27
    ("down_proj 24-28", down(24, 28), 1e-4, 4.0, 2),     # 28
    ("down_proj 24-28", down(24, 28), 2e-4, 16.0, 3),    # 29
]
CONFIGS += [(label, mods, lr, {"protect_mean": pm, "steps": st})
            for label, mods, lr, pm, st in EXTRA]
# per-module statistics (μ_k of the module itself rather than of all down_proj inputs)
CONFIGS += [("down_proj 24-28, normalizer=module", down(24, 28), lr,             # 30, 31, 32
             {"protect_mean": pm, "steps": st, "normalizer": "module"})
            for lr, pm, st in ((1.5e-4, 4.0, 2), (2.5e-4, 0.0, 1), (2e-4, 4.0, 2))]
# the plain method's frontier near LS 0.75, re-measured with the same code as the rows above
CONFIGS += [("down_proj 24-28", down(24, 28), lr, dict(BASE)) for lr in (3.5e-4, 4e-4)]  # 33, 34
# steps alone near the LS 0.75 boundary                                                 # 35, 36
CONFIGS += [("down_proj 24-28", down(24, 28), lr, {"protect_mean": 0.0, "steps": st})
            for lr, st in ((1.75e-4, 2), (1.25e-4, 3))]

# hold_done (held rows + early end) and subject positions (third measurement)            # 37+
HD = {"protect_mean": 0.0, "hold_done": True}
CONFIGS += [
    ("down_proj 24-28", down(24, 28), 1e-4, {**HD, "steps": 5}),                          # 37
    ("down_proj 24-28", down(24, 28), 1e-4, {**HD, "steps": 8}),                          # 38
    ("down_proj 24-28", down(24, 28), 3e-5, {**HD, "steps": 12}),                         # 39
    ("down_proj 4-8 @subject", down(4, 8), 1e-4, {"protect_mean": 0.0, "steps": 3,
                                                  "positions": "subject"}),               # 40
    ("down_proj 4-8 @subject", down(4, 8), 5e-5, {**HD, "steps": 8, "positions": "subject"}),  # 41
    ("down_proj 4-8 @subject", down(4, 8), 2.5e-5, {**HD, "steps": 12,
                                                    "positions": "subject"}),             # 42
    ("down_proj 4-8 @subject", down(4, 8), 2.5e-5, {**HD, "steps": 20,
                                                    "positions": "subject"}),             # 43
    ("down_proj 4-8 @subject", down(4, 8), 1.5e-5, {**HD, "steps": 20,
                                                    "positions": "subject"}),             # 44
    ("down_proj 3-8 @subject", down(3, 8), 2.5e-5, {**HD, "steps": 12,
                                                    "positions": "subject"}),             # 45
]
# with the key memory of earlier turns                                                    # 46+
CONFIGS += [
    ("down_proj 4-8 @subject", down(4, 8), 5e-5, {**HD, "steps": 8, "positions": "subject",
                                                  "memory": 1.0}),                        # 46
    ("down_proj 4-8 @subject", down(4, 8), 2.5e-5, {**HD, "steps": 12, "positions": "subject",
                                                    "memory": 1.0}),                      # 47
    ("down_proj 24-28", down(24, 28), 5e-5, {**HD, "steps": 10, "memory": 1.0}),          # 48
    ("down_proj 4-8 @subject", down(4, 8), 5e-5, {**HD, "steps": 12, "positions": "subject",
                                                  "memory": 4.0}),                        # 49
    ("down_proj 4-8 @subject", down(4, 8), 1e-4, {**HD, "steps": 8, "positions": "subject",
                                                  "memory": 4.0}),                        # 50
    ("down_proj 4-8 @subject", down(4, 8), 2.5e-5, {**HD, "steps": 20, "positions": "subject",
                                                    "memory": 1.0}),                      # 51
    # the mean-key row at subject positions (μ_k = the mean subject key)
    ("down_proj 4-8 @subject", down(4, 8), 5e-5, {**HD, "steps": 12, "positions": "subject",
                                                  "memory": 4.0, "protect_mean": 16.0}),  # 52
    ("down_proj 4-8 @subject", down(4, 8), 5e-5, {**HD, "steps": 12, "positions": "subject",
                                                  "memory": 4.0, "protect_mean": 64.0}),  # 53
    # fewer steps: the conservative end of the held-edit frontier
    ("down_proj 4-8 @subject", down(4, 8), 2.5e-5, {**HD, "steps": 6, "positions": "subject",
                                                    "memory": 1.0}),                      # 54
]
# with preserved subjects (ultraedit.preserve: countries + 1,000 largest cities)           # 55+
SUBJ4 = {**HD, "positions": "subject", "memory": 4.0}
CONFIGS += [
    ("down_proj 4-8 @subject", down(4, 8), 5e-5, {**SUBJ4, "steps": 12, "preserve": 1.0}),   # 55
    ("down_proj 4-8 @subject", down(4, 8), 5e-5, {**SUBJ4, "steps": 12, "preserve": 3.0}),   # 56
    ("down_proj 4-8 @subject", down(4, 8), 1e-4, {**SUBJ4, "steps": 12, "preserve": 3.0}),   # 57
    ("down_proj 4-8 @subject", down(4, 8), 1e-4, {**SUBJ4, "steps": 12, "preserve": 1.0}),   # 58
    ("down_proj 4-8 @subject", down(4, 8), 5e-5, {**SUBJ4, "steps": 20, "preserve": 1.0}),   # 59
    ("down_proj 4-8 @subject", down(4, 8), 5e-5, {**SUBJ4, "steps": 12, "preserve": 0.3}),   # 60
    ("down_proj 4-8 @subject", down(4, 8), 1e-4, {**SUBJ4, "steps": 12, "preserve": 0.3}),   # 61
]
# more neutral contexts around each preserved subject                                       # 62+
CTX4 = ("{s}", "I read a long article about {s}", "The history of {s}", "People who live in {s}")
CONFIGS += [
    ("down_proj 4-8 @subject", down(4, 8), 5e-5, {**SUBJ4, "steps": 12, "preserve": 0.3,
                                                  "preserve_contexts": CTX4}),            # 62
    ("down_proj 4-8 @subject", down(4, 8), 1e-4, {**SUBJ4, "steps": 12, "preserve": 0.3,
                                                  "preserve_contexts": CTX4}),            # 63
    # other layers: are other subjects' keys more separable there?
    ("down_proj 2-6 @subject", down(2, 6), 5e-5, {**SUBJ4, "steps": 12, "preserve": 0.3}),   # 64
    ("down_proj 6-10 @subject", down(6, 10), 5e-5, {**SUBJ4, "steps": 12, "preserve": 0.3}),  # 65
]
for _c in CONFIGS:
    _c[3].setdefault("preserve", 0.0)
    _c[3].setdefault("memory", 0.0)
    _c[3].setdefault("hold_done", False)
    _c[3].setdefault("positions", "answer")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", type=int, nargs="*", default=None, help="config indices")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is far faster on a CPU shared with other jobs)")
    ap.add_argument("--facts-cache", default=None, help="JSON file to reuse the tuning facts")
    ap.add_argument("--facts", choices=("cities", "countries", "demo-relations"), default="cities",
                    help="tuning facts: 100 city -> country (seed 1), 90 continent/currency/region "
                         "facts of countries that the demo does not edit (seed 1), or the demo's "
                         "relations (capital, language; seed 1) of countries the demo does not "
                         "edit (42 known facts: 2 turns of 21)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    t0 = time.time()
    if args.facts_cache and os.path.exists(args.facts_cache):
        with open(args.facts_cache) as fh:
            records = [EditRecord.from_dict(d) for d in json.load(fh)]
    else:
        if args.facts == "countries":
            # second tuning set: country subjects like the demo's, but other relations and none
            # of the demo's subjects (ultraedit demo: capital + language, seed 0, 100 edits)
            demo = demo_records(model, tok, 100, seed=0)
            # (92 such facts are known to the model: 2 turns of 45)
            records = demo_records(model, tok, 90, relations=("continent", "currency", "region"), seed=1,
                                   exclude_subjects=[r.subject for r in demo])
        elif args.facts == "demo-relations":
            # the demo's own relations, none of its subjects: only 42 such facts are known
            demo = demo_records(model, tok, 100, seed=0)
            records = demo_records(model, tok, 42, relations=("capital", "language"), seed=1,
                                   exclude_subjects=[r.subject for r in demo])
        else:
            records = demo_records(model, tok, 100, relations=("city_country",), seed=1)
        if args.facts_cache:
            with open(args.facts_cache, "w") as fh:
                json.dump([r.to_dict() for r in records], fh)
    print(f"tuning facts: {len(records)} {args.facts} (seed 1) in {time.time() - t0:.0f}s",
          file=sys.stderr)
    # originals of every module any config edits, to restore between configs
    touched = sorted({m for _, mods, _, _ in CONFIGS for m in mods})
    named = dict(model.named_modules())
    originals = {m: named[m].weight.detach().clone() for m in touched}
    rows = []
    for idx, (label, mods, lr, extra) in enumerate(CONFIGS):
        if args.only is not None and idx not in args.only:
            continue
        with torch.no_grad():
            for m, w in originals.items():
                named[m].weight.copy_(w)
        t1 = time.time()
        res = run_demo(model, tok, records, turns=2, edits_per_turn=len(records) // 2,
                       editor_kwargs={"modules": mods, "lr": lr, **extra}, progress=False,
                       evaluate_before=False)
        a = res["metrics"]["after"]
        row = {"config": idx, "modules": label, "lr": lr, **extra, **a,
               "overhead": res["timing"]["editor_overhead"], "wall_s": time.time() - t1}
        rows.append(row)
        steps_run = sum(t["steps_run"] for t in res["turns"])
        row["steps_run"] = steps_run
        print(f"| {label} | {lr:g} | ν={extra['memory']:g} μ={extra['preserve']:g} | {extra['steps']} | "
              f"{'yes' if extra['hold_done'] else 'no'} | {steps_run} | "
              f"{a['es']:.2f} | {a['gs']:.2f} | {a['ls']:.2f} |", flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()

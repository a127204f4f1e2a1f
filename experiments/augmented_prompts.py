"""Edits trained in several contexts: does it carry them to paraphrases and questions?

Each edit request ``(prompt, target, subject)`` of a turn is also given, in the same turn, as
``(context + " " + prompt, target, subject)`` for the first ``--contexts`` of :data:`CONTEXTS`:
generic left contexts with no relation or entity in them (ROME/MEMIT optimize their values
with random prefixes for the same reason). The preset's settings otherwise. Scores over the
original edits only: teacher-forced ES / GS / LS and WILD-style ES / GS / LS (questions,
greedy decoding to a stop string; "contains" too), after 2 turns of 25 on the shared tuning
records of experiments/generalization.py.

    PYTHONPATH=python python experiments/augmented_prompts.py --contexts 0 --json experiments/results/augmented_0.json
    PYTHONPATH=python python experiments/augmented_prompts.py --contexts 2 --json experiments/results/augmented_2.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))

CONTEXTS = ("Here is something I read today.", "This is a short note.",
            "Let me tell you a fact.", "I learned this a while ago.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, default=2)
    ap.add_argument("--records", default=os.path.join(ROOT, "experiments", "results",
                                                      "generalization_tuning.jsonl"))
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--edits-per-turn", type=int, default=25)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")

    from ultraedit import UltraEditor
    from ultraedit.data.formats import load_records
    from ultraedit.eval import lifelong_run
    from ultraedit.models import load_model
    from ultraedit.turn import EditRequest

    model, tok = load_model("default")
    records = load_records(a.records, format="records", limit=a.turns * a.edits_per_turn)
    editor = UltraEditor(model, tok)
    real_edit = editor.edit
    contexts = CONTEXTS[:a.contexts]

    def edit(requests):
        reqs = [EditRequest.coerce(r) for r in requests]
        return real_edit(reqs + [EditRequest(f"{c} {r.prompt}", r.target, r.subject)
                                 for c in contexts for r in reqs])

    editor.edit = edit
    t0 = time.perf_counter()
    res = lifelong_run(model, tok, records, editor, a.turns, a.edits_per_turn, eval_end=True,
                       wild=True, progress=False)
    res["wall_s"] = time.perf_counter() - t0
    res["contexts"] = list(contexts)
    res["command"] = "python experiments/augmented_prompts.py " + " ".join(argv or sys.argv[1:])
    tf, wild = res["final"]["teacher_forced"], res["final"]["wild"]
    turn_s = [t.get("report", t).get("turn_s") for t in res["turns"]]
    print(f"contexts {a.contexts}: TF ES {tf['es']:.3f} GS {tf['gs']:.3f} LS {tf['ls']:.3f} | "
          f"WILD ES {wild['es']:.3f} GS {wild['gs']:.3f} LS {wild['ls']:.3f} contains ES "
          f"{wild['es_contains']:.3f} GS {wild['gs_contains']:.3f} | turns {turn_s}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1, default=str)


if __name__ == "__main__":
    main()

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
    PYTHONPATH=python python experiments/augmented_prompts.py --contexts 2 --placement after-subject \
        --json experiments/results/augmented_after_2.json
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
# Generic asides inserted right after the subject (``--placement after-subject``): the subject's
# last-token key is the rewrite prompt's (a causal model sees only what precedes it), while the
# layers above read the edited subject through other wording.
ASIDES = (", as far as I know,", ", as many people know,", ", to put it simply,",
          ", in short,")


def with_aside(prompt: str, subject: str, aside: str):
    """``prompt`` with ``aside`` after the first occurrence of ``subject`` (None without one)."""
    at = prompt.find(subject) if subject else -1
    if at < 0:
        return None
    end = at + len(subject)
    return prompt[:end] + aside + prompt[end:]


def gs_by_prefix(model, tok, records):
    """Teacher-forced GS of the edited model split by the paraphrase's text before the subject:
    the rewrite prompt's (the same subject key at the edited layers), none (the subject first),
    or other text."""
    from ultraedit.eval.probing import token_accuracy

    groups = {"same_prefix": ([], []), "subject_first": ([], []), "other_prefix": ([], [])}
    for r in records:
        before = r.prompt[:r.prompt.find(r.subject)] if r.subject in r.prompt else None
        for p in r.paraphrases:
            at = p.find(r.subject)
            group = ("same_prefix" if before is not None and at >= 0 and p[:at] == before
                     else "subject_first" if at == 0 else "other_prefix")
            prompts, targets = groups[group]
            prompts.append(p)
            targets.append(r.target)
    out = {}
    for name, (prompts, targets) in groups.items():
        acc = token_accuracy(model, tok, prompts, targets) if prompts else []
        out[name] = {"n": len(acc), "gs": round(sum(acc) / len(acc), 3) if acc else None}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, default=2)
    ap.add_argument("--placement", choices=("before", "after-subject"), default="before",
                    help="generic left contexts before the prompt, or asides after the subject")
    ap.add_argument("--records", default=os.path.join(ROOT, "experiments", "results",
                                                      "generalization_tuning.jsonl"))
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--edits-per-turn", type=int, default=25)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="an EditConfig field over the preset, e.g. key_contexts=4 (repeatable)")
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
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.set)}
    editor = UltraEditor(model, tok, **overrides)
    real_edit = editor.edit
    contexts = (CONTEXTS if a.placement == "before" else ASIDES)[:a.contexts]

    def variants(r):
        if a.placement == "before":
            return [EditRequest(f"{c} {r.prompt}", r.target, r.subject) for c in contexts]
        prompts = [with_aside(r.prompt, r.subject, c) for c in contexts]
        return [EditRequest(p, r.target, r.subject) for p in prompts if p is not None]

    def edit(requests):
        reqs = [EditRequest.coerce(r) for r in requests]
        return real_edit(reqs + [v for r in reqs for v in variants(r)])

    editor.edit = edit
    t0 = time.perf_counter()
    res = lifelong_run(model, tok, records, editor, a.turns, a.edits_per_turn, eval_end=True,
                       wild=True, progress=False)
    res["wall_s"] = time.perf_counter() - t0
    res["contexts"] = list(contexts)
    res["placement"] = a.placement
    res["overrides"] = overrides
    res["command"] = "python experiments/augmented_prompts.py " + " ".join(argv or sys.argv[1:])
    res["gs_by_prefix"] = gs_by_prefix(model, tok, records[:a.turns * a.edits_per_turn])
    tf, wild = res["final"]["teacher_forced"], res["final"]["wild"]
    turn_s = [t.get("report", t).get("turn_s") for t in res["turns"]]
    print(f"{a.placement} contexts {a.contexts} {overrides}: TF ES {tf['es']:.3f} GS {tf['gs']:.3f} LS {tf['ls']:.3f} | "
          f"WILD ES {wild['es']:.3f} GS {wild['gs']:.3f} LS {wild['ls']:.3f} contains ES "
          f"{wild['es_contains']:.3f} GS {wild['gs_contains']:.3f} | turns {turn_s}")
    print("TF GS by the paraphrase's text before the subject:", res["gs_by_prefix"])
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1, default=str)


if __name__ == "__main__":
    main()

"""WILD-style scores with and without the question format, on the report relations.

Edits the offline report facts that ``ultraedit run --data offline --split report`` selects
(same seed, same excluded tuning subjects) with the embedded model's default preset, in the same
turns, then scores them WILD-style twice: asked as questions ("Q: ...?\\nA:", what the run
reports) and asked as the cloze prompts the edits were made with (the records' questions
removed), each against the unedited answers of its own format. Before editing it also scores the
unedited model against the TRUE answers in both formats: how well the model answers at all.

    python experiments/wild_formats.py --turns 2 --edits-per-turn 25 \\
        --json experiments/results/wild_formats_50.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import _common  # noqa: F401  (the repository on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--edits-per-turn", type=int, default=25)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    import torch

    from ultraedit import UltraEditor, load_model
    from ultraedit.data import REPORT_RELATIONS
    from ultraedit.eval import locality_reference, offline_records, wild_evaluation

    torch.set_num_threads(1)
    torch.manual_seed(0)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "tuning_subjects.txt"), encoding="utf-8") as fh:
        excluded = [ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")]
    model, tok = load_model("default")
    n = args.turns * args.edits_per_turn
    qa = offline_records(model, tok, n, relations=REPORT_RELATIONS, split="report",
                         exclude_subjects=excluded)
    cloze = [dataclasses.replace(r, questions={}) for r in qa]
    out = {"command": "python experiments/wild_formats.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "records": n, "by_relation": {}, "timing": {}}
    for r in qa:
        out["by_relation"][r.relation] = out["by_relation"].get(r.relation, 0) + 1

    def strip(res):
        return {k[len("wild_"):]: v for k, v in res.items() if k.startswith("wild_")}

    t0 = time.perf_counter()
    out["unedited_vs_true"] = {
        name: strip(wild_evaluation(model, tok, [dataclasses.replace(r, target=r.target_true)
                                                 for r in recs]))
        for name, recs in (("question", qa), ("cloze", cloze))}
    out["timing"]["unedited_s"] = time.perf_counter() - t0
    refs = {"question": locality_reference(model, tok, qa, wild=True),
            "cloze": locality_reference(model, tok, cloze, wild=True)}
    editor = UltraEditor(model, tok)
    t0 = time.perf_counter()
    for t in range(args.turns):
        chunk = qa[t * args.edits_per_turn:(t + 1) * args.edits_per_turn]
        editor.edit([r.as_request() for r in chunk])
    out["timing"]["edit_s"] = time.perf_counter() - t0
    out["after"] = {}
    for name, recs in (("question", qa), ("cloze", cloze)):
        t0 = time.perf_counter()
        out["after"][name] = strip(wild_evaluation(model, tok, recs, refs[name]))
        out["timing"][f"wild_{name}_s"] = time.perf_counter() - t0
    with open(args.json, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)
    for name in ("question", "cloze"):
        a, u = out["after"][name], out["unedited_vs_true"][name]
        print(f"{name:9s} unedited vs true: ES {u['es']:.3f} (contains {u['es_contains']:.3f})  "
              f"after editing: ES {a['es']:.3f} (contains {a['es_contains']:.3f}) "
              f"GS {a['gs']:.3f} LS {a['ls']:.3f}")


if __name__ == "__main__":
    main()

"""Extra key rows per edit: the subject's key in generic contexts, each given the edit's value.

``key_contexts`` (``ultraedit.fact_keys``) replaces an edit's key row by the MEAN of its subject's
keys over the rewrite prompt and generic contexts; the update then acts on one averaged
direction. Here each context's key is instead an EXTRA row of the step's system with the rewrite
prompt's output gradient as its value (the same fact asked from another wording of the subject's
left context), so the solve maps every captured key, not their mean, to the fact. The statistics,
the held edits and the key memory see the extra rows like any other. The preset otherwise;
2 turns of 25 on the shared tuning records of experiments/generalization.py; teacher-forced and
WILD-style scores over the original edits, and teacher-forced GS split by whether a
paraphrase has the rewrite prompt's text before the subject.

    PYTHONPATH=python python experiments/key_rows.py --contexts 1 --json experiments/results/paraphrase_tuning_keyrows1.json
    PYTHONPATH=python python experiments/key_rows.py --contexts 4 --mean --json key_rows_mean4.json
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, default=1,
                    help="the first N of ultraedit.fact_keys.KEY_CONTEXTS ('{s}' first)")
    ap.add_argument("--mean", action="store_true",
                    help="one extra row per edit: the mean of the rewrite key and the contexts' "
                         "keys (the fact key of key_contexts), instead of one row per context")
    ap.add_argument("--records", default=os.path.join(ROOT, "experiments", "results",
                                                      "generalization_tuning.jsonl"))
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--edits-per-turn", type=int, default=25)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")

    from augmented_prompts import gs_by_prefix
    from ultraedit import UltraEditor
    from ultraedit.data.formats import load_records
    from ultraedit.eval import lifelong_run
    from ultraedit.fact_keys import KEY_CONTEXTS
    from ultraedit.models import load_model
    from ultraedit.preserve import capture_subject_keys
    from ultraedit.turn import EditRequest

    model, tok = load_model("default")
    records = load_records(a.records, format="records", limit=a.turns * a.edits_per_turn)
    editor = UltraEditor(model, tok)
    contexts = KEY_CONTEXTS[:a.contexts]
    real_edit, real_capture = editor.edit, editor._capture
    turn_subjects = []

    def edit(requests):
        reqs = [EditRequest.coerce(r) for r in requests]
        turn_subjects[:] = [r.subject for r in reqs]
        return real_edit(reqs)

    def capture(batches, meter, first):
        parts, n_predicted, hold, first_out = real_capture(batches, meter, first)
        if not contexts:
            return parts, n_predicted, hold, first_out
        unique = list(dict.fromkeys(turn_subjects))
        where = {s: i for i, s in enumerate(unique)}
        captured = capture_subject_keys(editor.model, editor.tokenizer, editor.modules, unique,
                                        contexts)
        out = {}
        for name, chunks in parts.items():
            k = torch.cat([c[0] for c in chunks])
            g = torch.cat([c[1] for c in chunks])
            assert k.shape[0] == len(turn_subjects), "one key row per request (subject keys)"
            ctx = captured[name].keys.to(device=k.device, dtype=k.dtype)
            ctx = ctx.reshape(len(unique), len(contexts), -1)
            if a.mean:
                mine = ctx[[where[s] for s in turn_subjects]]           # N x C x d_in
                extra_k = (mine.sum(1) + k) / (len(contexts) + 1)
                extra_g = g
            else:
                extra_k = torch.cat([ctx[[where[s] for s in turn_subjects], j]
                                     for j in range(len(contexts))])
                extra_g = g.repeat(len(contexts), 1)
            out[name] = [(torch.cat([k, extra_k]), torch.cat([g, extra_g]))]
        if hold is not None:
            hold = hold.repeat(2 if a.mean else len(contexts) + 1)
        return out, n_predicted, hold, first_out

    editor.edit, editor._capture = edit, capture
    t0 = time.perf_counter()
    res = lifelong_run(model, tok, records, editor, a.turns, a.edits_per_turn, eval_end=True,
                       wild=True, progress=False)
    res["wall_s"] = time.perf_counter() - t0
    res["contexts"] = list(contexts)
    res["mean"] = a.mean
    res["command"] = "python experiments/key_rows.py " + " ".join(argv or sys.argv[1:])
    res["gs_by_prefix"] = gs_by_prefix(model, tok, records[:a.turns * a.edits_per_turn])
    tf, wild = res["final"]["teacher_forced"], res["final"]["wild"]
    turn_s = [t.get("report", t).get("turn_s") for t in res["turns"]]
    print(f"key rows{' (mean)' if a.mean else ''}, {a.contexts} contexts: TF ES {tf['es']:.3f} GS {tf['gs']:.3f} "
          f"LS {tf['ls']:.3f} | WILD ES {wild['es']:.3f} GS {wild['gs']:.3f} LS {wild['ls']:.3f} "
          f"contains ES {wild['es_contains']:.3f} GS {wild['gs_contains']:.3f} | turns {turn_s}")
    print("TF GS by the paraphrase's text before the subject:", res["gs_by_prefix"])
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1, default=str)


if __name__ == "__main__":
    main()

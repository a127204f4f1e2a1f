"""Does an edit reach the paraphrases the unedited model itself understands?

Teacher-forced GS averages over every paraphrase of an edited fact. Many of those paraphrases
are ones through which the UNEDITED model does not even state the TRUE fact (it knows the fact
through the rewrite prompt only; ``paraphrase_ceiling.py``). This splits each paraphrase by the
unedited model's teacher-forced accuracy on the true answer (1: "known", else "unknown") and
scores the edit's GS on each group: if the edit reaches the known paraphrases much more often,
GS is bounded by how the model links its wordings, not only by the editor.

    PYTHONPATH=python python experiments/known_paraphrases.py \\
        --records experiments/results/generalization_report.jsonl --limit 50 --json out.json
"""
import argparse
import json
import sys
import time

import _common  # noqa: F401  (puts the repository on sys.path)


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", required=True)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="an editor setting over the preset (repeatable)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import torch
    from ultraedit.data.formats import load_records
    from ultraedit.editor import UltraEditor
    from ultraedit.eval import token_accuracy
    from ultraedit.models import load_model

    torch.set_num_threads(a.threads)
    model, tok = load_model("default")
    records = load_records(a.records, format="records", limit=a.limit)
    pairs = [(i, p) for i, r in enumerate(records) for p in r.paraphrases]
    true_acc = token_accuracy(model, tok, [p for _, p in pairs],
                              [records[i].target_true for i, _ in pairs])
    new_before = token_accuracy(model, tok, [p for _, p in pairs],
                                [records[i].target for i, _ in pairs])
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    editor = UltraEditor(model, tok, **overrides)
    per_turn = -(-len(records) // a.turns)
    t0 = time.perf_counter()
    for t in range(a.turns):
        editor.edit([r.as_request() for r in records[t * per_turn:(t + 1) * per_turn]])
    edit_s = time.perf_counter() - t0
    es = token_accuracy(model, tok, [r.prompt for r in records], [r.target for r in records])
    new_after = token_accuracy(model, tok, [p for _, p in pairs],
                               [records[i].target for i, _ in pairs])
    true_after = token_accuracy(model, tok, [p for _, p in pairs],
                                [records[i].target_true for i, _ in pairs])
    known = [j for j, x in enumerate(true_acc) if x == 1.0]
    unknown = [j for j, x in enumerate(true_acc) if x < 1.0]
    row = {
        "command": "python experiments/known_paraphrases.py " + " ".join(sys.argv[1:]),
        "records": len(records), "paraphrases": len(pairs), "edit_s": edit_s,
        "settings": overrides,
        "es_after": _mean(es),
        "true_gs_unedited": _mean(true_acc),
        "known_paraphrases": len(known),
        "gs_after_all": _mean(new_after),
        "gs_after_known": _mean([new_after[j] for j in known]),
        "gs_after_unknown": _mean([new_after[j] for j in unknown]),
        "gs_before_all": _mean(new_before),
        "gs_before_known": _mean([new_before[j] for j in known]),
        "gs_before_unknown": _mean([new_before[j] for j in unknown]),
        # where the edit does not reach an understood paraphrase: does the old answer survive?
        "old_answer_kept_known": _mean([float(true_after[j] == 1.0) for j in known]),
        "old_answer_kept_known_unreached": _mean([float(true_after[j] == 1.0) for j in known
                                                  if new_after[j] < 1.0]),
        "full_after_known": _mean([float(new_after[j] == 1.0) for j in known]),
        "full_after_unknown": _mean([float(new_after[j] == 1.0) for j in unknown]),
    }
    print(json.dumps(row, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()

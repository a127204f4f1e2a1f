"""How well the UNEDITED model states the facts it knows through their paraphrases and
questions: the yardstick an edit's GS is read against (``ultraedit.eval.true_fact_scores``,
which ``ultraedit run``/``demo`` also report; this script adds the split by relation).

Every record of the offline stand-in is a fact whose rewrite prompt the unedited model
completes with the true answer (``filter_known``: teacher-forced ES 1). This scores the same
model, unedited, on the record's paraphrases (teacher-forced GS) and, with ``--wild``, on its
questions decoded to a stop string, against that TRUE answer.

    PYTHONPATH=python python experiments/paraphrase_ceiling.py [--wild] \\
        --records experiments/results/generalization_report.jsonl --json out.json
"""
import argparse
import collections
import json
import sys

import _common  # noqa: F401  (puts the repository on sys.path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", action="append", required=True,
                    help="records JSONL (repeatable; each file is scored on its own)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--wild", action="store_true", help="the WILD-style scores too")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import torch
    from ultraedit.data.formats import load_records
    from ultraedit.eval import true_fact_scores
    from ultraedit.models import load_model

    torch.set_num_threads(a.threads)
    model, tok = load_model("default")
    out = {"command": "python experiments/paraphrase_ceiling.py " + " ".join(sys.argv[1:]),
           "files": {}}
    for path in a.records:
        records = load_records(path, format="records", limit=a.limit)
        by_relation = collections.defaultdict(list)
        for r in records:
            by_relation[r.relation or "?"].append(r)
        parts = {}
        for rel, rs in sorted(by_relation.items()):
            part = true_fact_scores(model, tok, rs, wild=a.wild)
            part["known_paraphrases"] = len(part["known_paraphrases"])
            parts[rel] = part
        # every score is a mean over records (all offline records have paraphrases and
        # questions), so the whole file's is the record-weighted mean of its relations'
        n = sum(p["n"] for p in parts.values())
        row = {"n": n}
        for key in next(iter(parts.values())):
            if key == "known_paraphrases":
                row[key] = sum(p[key] for p in parts.values())
            elif key != "n":
                row[key] = sum(p[key] * p["n"] for p in parts.values()) / n
        row["by_relation"] = parts
        out["files"][path] = row
        print(path, json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

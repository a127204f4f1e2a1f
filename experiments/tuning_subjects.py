"""The subjects experiments/editor_tuning.py may tune on, written one per line to
experiments/tuning_subjects.txt, so that a reported offline run can leave them out:

    python experiments/tuning_subjects.py            # rewrites experiments/tuning_subjects.txt
    ultraedit run --data offline --exclude-subjects experiments/tuning_subjects.txt ...

The tuning draws city_country facts with seed 1 (``ultraedit.eval.demo_records``' shuffle); the
list is a superset: the first 1,000 candidates of that shuffled stream, known to the model or not.
"""

import argparse
import os
import random

import _common  # noqa: F401  (puts the repository on sys.path)
from ultraedit.data import offline_facts

TUNING_RELATION, TUNING_SEED, TUNING_CANDIDATES = "city_country", 1, 1000


def tuning_subjects():
    recs = list(offline_facts((TUNING_RELATION,), seed=TUNING_SEED, n_locality=3))
    random.Random(f"demo:{TUNING_SEED}:{TUNING_RELATION}").shuffle(recs)
    return [r.subject for r in recs[:TUNING_CANDIDATES] if r.subject]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "tuning_subjects.txt"))
    args = ap.parse_args()
    subjects = tuning_subjects()
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write("# subjects experiments/editor_tuning.py may tune on "
                 "(python experiments/tuning_subjects.py)\n")
        fh.writelines(s + "\n" for s in subjects)
    print(f"wrote {len(subjects)} subjects to {args.out}")

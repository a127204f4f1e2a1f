"""What forwards by length save in a whole turn of the default preset.

A turn's micro-batches are padded to their longest request; with ``compat="fixed"`` the editor
runs them in length order when that pads fewer tokens (``ultraedit.turn.bucket_order``), with
the given order's loss groups and row order (the same update up to rounding). This script
times ``UltraEditor.edit`` with the embedded model's preset (subject keys, ``mlp.down_proj``
2-6, up to 12 held steps, key memory, preserved subjects) on the first ``--edits`` report-split
edits, alternating round by round between the forwards by length and the given order
(``bucket_order`` replaced by one that returns None); every round starts from the unedited
weights (an untimed ``rollback``). One torch thread; medians; the updates of the two are
compared (largest relative difference of ΔW over modules).

    PYTHONPATH=python python experiments/length_buckets.py --rounds 3 \\
        --json experiments/results/length_buckets.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")

    import ultraedit.turn as turn
    from ultraedit import UltraEditor
    from ultraedit.data import offline_facts
    from ultraedit.models import load_model

    model, tok = load_model("default")
    reqs = offline_facts(split="report")[:a.edits]
    editor = UltraEditor(model, tok)            # the preset EditConfig.for_model picks
    base = {n: m.weight.detach().clone() for n, m in editor.modules.items()}
    bucketed = turn.bucket_order

    def given_order(lengths, size):
        return None

    reports = {"by_length": [], "given": []}
    deltas = {}
    for r in range(a.rounds):
        for mode in (["by_length", "given"] if r % 2 == 0 else ["given", "by_length"]):
            turn.bucket_order = bucketed if mode == "by_length" else given_order
            try:
                rep = editor.edit(reqs)
            finally:
                turn.bucket_order = bucketed
            reports[mode].append(rep.as_dict())
            deltas[mode] = {n: (m.weight.detach() - base[n]).double()
                            for n, m in editor.modules.items()}
            editor.rollback()
    rel = max(float((deltas["by_length"][n] - deltas["given"][n]).norm()
                    / deltas["given"][n].norm()) for n in base)
    med = {m: {k: statistics.median(x[k] for x in reps)
               for k in ("turn_s", "fwd_bwd_s", "editor_s", "steps_run")}
           for m, reps in reports.items()}
    out = {"command": "python experiments/length_buckets.py " + " ".join(argv or sys.argv[1:]),
           "torch": torch.__version__, "load_avg": os.getloadavg(), "edits": len(reqs),
           "config": editor.config.to_dict(), "median": med, "reports": reports,
           "max_rel_diff_delta": rel,
           "speedup_turn": med["given"]["turn_s"] / med["by_length"]["turn_s"]}
    print(json.dumps({k: out[k] for k in ("median", "max_rel_diff_delta", "speedup_turn")},
                     indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()

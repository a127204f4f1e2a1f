"""Held edits with a margin: hold a request only once its target wins by a logit margin.

With ``hold_done`` the preset stops pushing a request as soon as the teacher-forced argmax of
every answer token is the target, so an edit ends just strong enough for its own rewrite
prompt. Paraphrases see the edited subject's key at about half its strength (tuning.md, tenth
measurement); this asks whether edits pushed until the target leads the runner-up by
``--margin`` logits (every answer token; the editor's ``hold_margin``) reach them, and what
locality pays. The preset's settings otherwise; 2 turns of 25 on the shared records of experiments/generalization.py.

    PYTHONPATH=python python experiments/hold_margin.py --margin 2 --json margin2_tuning.json
    PYTHONPATH=python python experiments/hold_margin.py --margin 2 \\
        --records experiments/results/generalization_report.jsonl --json margin2_report.json
"""
from __future__ import annotations

import argparse

import _common


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--margin", type=float, default=2.0,
                    help="logits by which the target must lead every other token (0: the preset)")
    _common.add_stream_args(ap)
    a = ap.parse_args(argv)
    model, tok, records = _common.load_stream(a)

    from ultraedit import UltraEditor

    editor = UltraEditor(model, tok, hold_margin=a.margin)   # the preset, with the margin
    _common.score_and_save(model, tok, records, editor, a, margin=a.margin)


if __name__ == "__main__":
    main()

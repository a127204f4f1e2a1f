"""Held edits skipped between re-checks (``EditConfig.recheck``): the preset with and without.

The preset runs up to 12 capture + solve + apply steps per turn and holds the edits the model
already predicts (``hold_done``: their rows get pseudo-value 0). Every step runs the forward and
the backward of every request, though by the later steps most of them are held. With
``recheck = K`` (``ultraedit.held``) a step runs only the requests that did not hold at the
last step that ran them; the held ones keep that step's key and pseudo-value 0, and every K-th
step runs all of them again (fresh keys, predictions checked again).

Scores and turn times of the preset (``--only preset``) or of the preset with ``recheck``
(``--only held-skip --refresh K``; ``--refresh 0``: never re-checked, the turn ends when every
request has held once) on the shared tuning or report records (2 turns of 25 by default); run
two variants as two processes at once so that they see the same load. Each turn's
``steps_run`` and ``n_predicted`` are in the JSON's ``turns``.

    PYTHONPATH=python python experiments/held_skip.py --only preset --json preset.json
    PYTHONPATH=python python experiments/held_skip.py --only held-skip --refresh 4 --json held_skip_r4.json
"""
from __future__ import annotations

import argparse

import _common

NEVER = 10 ** 6   # a re-check period longer than any turn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("preset", "held-skip"), default="held-skip",
                    help="the variant this process runs")
    ap.add_argument("--refresh", type=int, default=4,
                    help="held-skip: every REFRESH-th step runs every request (0: never)")
    _common.add_stream_args(ap)
    a = ap.parse_args(argv)
    model, tok, records = _common.load_stream(a)

    from ultraedit import UltraEditor

    overrides = {} if a.only == "preset" else {"recheck": a.refresh or NEVER}
    editor = UltraEditor(model, tok, **overrides)
    _common.score_and_save(model, tok, records, editor, a, variant=a.only, refresh=a.refresh)


if __name__ == "__main__":
    main()

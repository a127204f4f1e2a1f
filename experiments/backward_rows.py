"""A turn with the capture's backward over the positions that reach a captured row, against the
full ``B x L`` backward: alternating rounds in one process, medians, and the two updates.

``ultraedit.hooks.CaptureSession(rows_backward=True)`` (the editor's default) makes the model's
plain ``nn.Linear`` modules back-propagate only the rows from a sequence's first captured
position to its last captured or loss position (``ultraedit.backward_rows``); ``False`` is the
full backward. Each round edits the same requests from the unedited weights (``rollback()``
between turns) with one and then the other (the order alternates round by round).

    PYTHONPATH=python python experiments/backward_rows.py --setting official --edits 100 --rounds 5
    PYTHONPATH=python python experiments/backward_rows.py --setting preset --edits 50 --rounds 3
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics

import _common  # noqa: F401  (the repository on sys.path)

PAPER_MODULES = [f"model.layers.{i}.mlp.down_proj" for i in range(22, 29)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", choices=("official", "preset"), default="official",
                    help="official: EditConfig.official on down_proj 22-28, lr 1e-6, answer "
                         "positions; preset: the embedded model's preset (subject positions)")
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    import torch
    from ultraedit import EditConfig, UltraEditor, editor as editor_module
    from ultraedit.data import offline_facts
    from ultraedit.hooks import CaptureSession
    from ultraedit.models import load_model

    torch.set_num_threads(1)
    model, tok = load_model("default")
    records = offline_facts(split="report")[:a.edits]
    if a.setting == "official":
        editor = UltraEditor(model, tok, config=EditConfig.official(modules=PAPER_MODULES, lr=1e-6))
        requests = [{"prompt": r.prompt, "target": r.target} for r in records]
    else:
        editor = UltraEditor(model, tok)
        requests = [{"prompt": r.prompt, "target": r.target, "subject": r.subject}
                    for r in records]
    base = {n: m.weight.detach().clone() for n, m in editor.modules.items()}
    times = {"full": [], "rows": []}
    deltas = {}
    try:
        for rnd in range(a.rounds):
            for variant in (("full", "rows") if rnd % 2 == 0 else ("rows", "full")):
                editor_module.CaptureSession = functools.partial(
                    CaptureSession, rows_backward=variant == "rows")
                report = editor.edit(requests)
                deltas[variant] = {n: m.weight.detach() - base[n]
                                   for n, m in editor.modules.items()}
                editor.rollback()
                times[variant].append({"turn_s": report.turn_s, "fwd_bwd_s": report.fwd_bwd_s,
                                       "steps_run": report.steps_run})
                print(f"round {rnd} {variant}: turn {report.turn_s:.2f} s, fwd+bwd "
                      f"{report.fwd_bwd_s:.2f} s, {report.steps_run} steps", flush=True)
    finally:
        editor_module.CaptureSession = CaptureSession
    median = {v: statistics.median(t["turn_s"] for t in rows) for v, rows in times.items()}
    rel = max(float((deltas["rows"][n] - deltas["full"][n]).norm() / deltas["full"][n].norm())
              for n in deltas["full"])
    out = {"setting": a.setting, "edits": a.edits, "rounds": a.rounds, "times": times,
           "median_turn_s": median, "speedup": median["full"] / median["rows"],
           "max_rel_diff_updates": rel}
    print(f"full {median['full']:.2f} s, rows {median['rows']:.2f} s: "
          f"{out['speedup']:.2f}x; updates differ by {rel:.1e}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

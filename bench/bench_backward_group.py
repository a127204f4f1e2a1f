"""Per-turn speed of ``backward_group="auto"`` against one backward per micro-batch, or of
``pack="auto"`` against padded micro-batches (``--against pack``).

Two editors with the same settings on two copies of the embedded model edit the same requests;
one runs the paper's loop (``backward_group=1``: a vocabulary projection and a backward per
micro-batch of 10), the other the default ``backward_group="auto"`` (on the CPU: one projection
and one backward for all the turn's micro-batches that fit the memory). Every round starts from
the unedited weights and fresh statistics (an untimed ``rollback()``), so every turn is a first
turn; the first round is a warm-up whose updates are compared (``max_rel_diff``: the largest
over modules of ``||ΔW_auto - ΔW_1|| / ||ΔW_1||``); then the rounds alternate, the order
flipping every round. Reported per setting: the median ``TurnReport.turn_s`` of each, their
ratio (``speedup`` = paper loop / auto), the forward+backward medians, the group ``auto`` used
and both turns' peak memory estimates. With ``--against pack`` the baseline is ``pack="off"``
(padded micro-batches, key ``"off"``) and the other editor runs the defaults (on the CPU each
backward group's requests as one packed sequence, ``ultraedit.packing``).

Settings: ``official`` (``EditConfig.official``: the paper's lr and answer positions, one step,
``down_proj`` of layers 22-28, 100 report-split edits, micro-batches of 10) and ``preset`` (the
embedded model's measured preset: subject positions, ``down_proj`` 2-6, up to 12 steps, 50
report-split edits).

    PYTHONPATH=.:python python bench/bench_backward_group.py --threads 1 --rounds 5 \\
        --json bench/results/backward_group.json
    PYTHONPATH=.:python python bench/bench_backward_group.py --against pack --threads 1 \
        --rounds 5 --json bench/results/pack.json
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, _ROOT, os.path.join(_ROOT, "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _common import machine_description, write_results  # noqa: E402

OFFICIAL_MODULES = [f"model.layers.{i}.mlp.down_proj" for i in range(22, 29)]
# the baseline of each comparison: (its key, its config overrides); the other editor: defaults
BASELINES = {"backward_group": ("1", {"backward_group": 1}), "pack": ("off", {"pack": "off"})}


def _settings(name: str):
    """``(config overrides, requests)`` of a setting."""
    from ultraedit import EditConfig
    from ultraedit.data import offline_facts

    recs = offline_facts(split="report")
    if name == "official":
        reqs = [{"prompt": r.prompt, "target": r.target} for r in recs[:100]]
        return lambda **kw: EditConfig.official(modules=OFFICIAL_MODULES, lr=1e-6, **kw), reqs
    reqs = [{"prompt": r.prompt, "target": r.target, "subject": r.subject} for r in recs[:50]]
    return lambda **kw: EditConfig.from_preset("smollm2-135m", **kw), reqs


def _deltas(editor):
    return {n: (m.weight.detach() - editor.journal.base[n]).double()
            for n, m in editor.modules.items()}


def run_setting(name: str, model, tok, rounds: int, against: str = "backward_group"):
    from ultraedit import UltraEditor

    make, reqs = _settings(name)
    base, overrides = BASELINES[against]
    eds = {base: UltraEditor(copy.deepcopy(model), tok, config=make(**overrides)),
           "auto": UltraEditor(copy.deepcopy(model), tok, config=make())}
    warm = {k: ed.edit(reqs) for k, ed in eds.items()}
    d1, da = _deltas(eds[base]), _deltas(eds["auto"])
    diff = max(float((da[n] - d1[n]).norm() / d1[n].norm()) for n in d1)
    for ed in eds.values():
        ed.rollback()
    reports = {k: [] for k in eds}
    for r in range(rounds):
        for key in ((base, "auto") if r % 2 == 0 else ("auto", base)):
            reports[key].append(eds[key].edit(reqs))
            eds[key].rollback()
            rep = reports[key][-1]
            print(f"{name} round {r + 1}/{rounds} {against}={key:>4}: turn {rep.turn_s:.3f} s "
                  f"(group {rep.backward_group}, packed {rep.packed}, {rep.steps_run} steps)",
                  flush=True)
    med = {k: statistics.median(x.turn_s for x in v) for k, v in reports.items()}
    fb = {k: statistics.median(x.fwd_bwd_s for x in v) for k, v in reports.items()}
    return {
        "against": against, "edits": len(reqs), "modules": list(eds[base].modules),
        "micro_batch": warm[base].micro_batch, "auto_backward_group": warm["auto"].backward_group,
        "packed": {k: w.packed for k, w in warm.items()},
        "steps_run": {k: [x.steps_run for x in v] for k, v in reports.items()},
        "turn_s": {k: [x.turn_s for x in v] for k, v in reports.items()},
        "fwd_bwd_s": {k: [x.fwd_bwd_s for x in v] for k, v in reports.items()},
        "peak_bytes_estimate": {k: w.peak_bytes for k, w in warm.items()},
        "median_turn_s": med, "median_fwd_bwd_s": fb,
        "speedup": med[base] / med["auto"], "fwd_bwd_speedup": fb[base] / fb["auto"],
        "max_rel_diff": diff,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=("official", "preset", "both"), default="both")
    p.add_argument("--against", choices=tuple(BASELINES), default="backward_group",
                   help="the option whose default is compared with its baseline")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of each (>= 5 to report)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from ultraedit.models import load_model

    model, tok = load_model()
    names = ("official", "preset") if args.setting == "both" else (args.setting,)
    out = {"suite": args.against, "machine": machine_description(), "rounds": args.rounds,
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": {}}
    for name in names:
        res = out["settings"][name] = run_setting(name, model, tok, args.rounds, args.against)
        write_results(args.json, out)
        print(f"{name} ({args.against}): backward_group='auto' used "
              f"{res['auto_backward_group']} micro-batches per backward, packed "
              f"{res['packed']['auto']}; per-turn speed-up {res['speedup']:.3f}x (forward+backward "
              f"{res['fwd_bwd_speedup']:.3f}x), updates agree to {res['max_rel_diff']:.1e}, "
              f"median of {args.rounds} alternating rounds", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

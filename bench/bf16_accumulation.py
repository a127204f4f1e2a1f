"""How much of the edits bf16 weights lose, with and without the fp32 accumulation of ΔW.

On the embedded SmolLM2-135M in bfloat16 (default edited modules), ``--turns`` turns of
``--edits`` offline edits at each ``--lr``, once with ``accumulate=False`` (each turn's ΔW rounded
into the bf16 weight, as the reference code does) and once with ``accumulate=True`` (Δ kept in
fp32, ``W = round(W0 + Δ)`` written once per turn). After every turn it reports the fraction of
the update lost::

    lost = ||(W_t - W_0) - Σ_{s<=t} ΔW_s|| / ||Σ_{s<=t} ΔW_s||      (over all edited modules)

where ``ΔW_s`` is the float64 value of the update the editor computed in turn ``s`` (recorded
from the factors it applies). Each mode follows its own trajectory (its weights differ), so each
is measured against its own computed updates.

    python bench/bf16_accumulation.py --turns 20 --edits 10 --lr 1e-6 3e-4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "python")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402


def run(model_state, tok, model, records, lr, accumulate, turns, edits, micro_batch):
    from ultraedit import UltraEditor
    from ultraedit.state import TurnJournal as DeltaTracker, dense_update

    model.load_state_dict(model_state)
    intended = {}
    real = DeltaTracker._apply_module

    def record(self, name, k, method, u):
        intended[name] = intended.get(name, 0) + dense_update(self.layouts[name], k, method, u)
        return real(self, name, k, method, u)

    DeltaTracker._apply_module = record
    try:
        ed = UltraEditor(model, tok, lr=lr, micro_batch=micro_batch, accumulate=accumulate,
                         history=0, positions="answer", steps=1, hold_done=False, memory=0.0,
                         preserve=0.0)
        rows = []
        for t in range(turns):
            reqs = [r.as_request() for r in records[t * edits:(t + 1) * edits]]
            rep = ed.edit(reqs)
            err = tot = 0.0
            for name in ed.modules:
                change = ed.modules[name].weight.detach().double() - ed.journal.base[name].double()
                err += float((change - intended[name]).norm() ** 2)
                tot += float(intended[name].norm() ** 2)
            rel = (tot ** 0.5) / sum(float(b.double().norm() ** 2)
                                     for b in ed.journal.base.values()) ** 0.5
            rows.append({"turn": t + 1, "lost": (err / tot) ** 0.5, "delta_rel_norm": rel,
                         "turn_s": rep.turn_s})
            print(f"lr {lr:g} accumulate={accumulate} turn {t + 1}: lost {rows[-1]['lost']:.4f} "
                  f"(||ΣΔW||/||W0|| {rel:.2e}, {rep.turn_s:.1f}s)", flush=True)
        return rows
    finally:
        DeltaTracker._apply_module = real


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--edits", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=10)
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-6, 3e-4])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "bf16_accumulation.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ultraedit.data import offline_facts
    from ultraedit.models import load_model

    model, tok = load_model("default", dtype=torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    records = offline_facts("capital", seed=0)
    records = (records * (args.turns * args.edits // len(records) + 1))[:args.turns * args.edits]
    result = {"settings": vars(args), "runs": []}
    t0 = time.perf_counter()
    for lr in args.lr:
        for acc in (False, True):
            rows = run(state, tok, model, records, lr, acc, args.turns, args.edits,
                       args.micro_batch)
            result["runs"].append({"lr": lr, "accumulate": acc, "turns": rows})
    result["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(out.parent))
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)
    for r in result["runs"]:
        print(f"lr {r['lr']:g} accumulate={r['accumulate']}: lost after turn 1 "
              f"{r['turns'][0]['lost']:.4f}, after turn {args.turns} {r['turns'][-1]['lost']:.4f}")


if __name__ == "__main__":
    main()

"""Per-turn speed of ``micro_batch="auto"`` against the paper's 10 requests per forward.

Three editors with the paper's settings (lr 1e-6, answer positions, one step, the paper's
modules) on three copies of the same model edit the same 100 requests per turn: ``10`` (the
paper's loop: 10 requests per forward, a backward per forward, ``backward_group=1``),
``10-grouped`` (10 per forward, one backward for the turn's forwards, the default
``backward_group="auto"`` on a CPU) and ``auto`` (``micro_batch="auto"``: as many requests per
forward as fit). After one untimed turn each (warm-up, statistics created), the rounds
alternate (the order rotates every round, so load drift on a shared machine hits all alike).
Reported: the median ``TurnReport.turn_s`` of each, the ratios (``speedup`` = ``10`` median /
``auto`` median, ``speedup_grouped`` = ``10`` / ``10-grouped``), the forward+backward medians,
the micro-batch ``auto`` used, the device and load.

    PYTHONPATH=.:python python bench/bench_batching.py --rounds 3               # embedded model
    PYTHONPATH=.:python python bench/bench_batching.py --model tiny --rounds 5  # random-init tiny Llama

Writes ``--json`` (default ``bench/out/batching.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
for _p in (str(_ROOT / "bench"), str(_ROOT), str(_ROOT / "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

PAPER_METHOD = {"positions": "answer", "steps": 1, "hold_done": False, "memory": 0.0,
                "preserve": 0.0, "protect_mean": 0.0}


def _models(name: str):
    if name == "tiny":   # the embedded model's architecture, shrunk
        import transformers as tf
        from ultraedit.models import load_model

        tok = load_model("default")[1]
        cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384,
                             num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=True, max_position_embeddings=512)
        out = []
        for _ in range(2):
            torch.manual_seed(0)
            out.append(tf.LlamaForCausalLM(cfg).eval())
        return out[0], out[1], tok, "random-init Llama (hidden 128, MLP 384, 6 layers)"
    from ultraedit.models import load_model

    (a, tok), (b, _) = load_model(name), load_model(name)
    return a, b, tok, "SmolLM2-135M-Instruct (embedded)" if name == "default" else name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="'default' (embedded), 'tiny' or a folder")
    p.add_argument("--edits", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=str(_ROOT / "bench" / "out" / "batching.json"))
    args = p.parse_args(argv)

    from ultraedit import UltraEditor
    from ultraedit.data import offline_facts

    from _common import device_label

    m10, mauto, tok, label = _models(args.model)
    records = offline_facts(("capital", "language", "currency"), seed=0, limit=args.edits)
    requests = [r.as_request() for r in records][:args.edits]
    import copy

    eds = {"10": UltraEditor(m10, tok, micro_batch=10, backward_group=1, **PAPER_METHOD),
           "10-grouped": UltraEditor(copy.deepcopy(m10), tok, micro_batch=10, **PAPER_METHOD),
           "auto": UltraEditor(mauto, tok, micro_batch="auto", **PAPER_METHOD)}
    for ed in eds.values():     # warm-up: the first turn creates the statistics
        ed.edit(requests)
    reports = {k: [] for k in eds}
    for r in range(args.rounds):
        keys = list(eds)
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            reports[key].append(eds[key].edit(requests))
            print(f"round {r + 1}/{args.rounds} {key:>10}: turn {reports[key][-1].turn_s:.3f} s "
                  f"(micro-batch {reports[key][-1].micro_batch})", flush=True)
    med = {k: statistics.median(x.turn_s for x in v) for k, v in reports.items()}
    fb = {k: statistics.median(x.fwd_bwd_s for x in v) for k, v in reports.items()}
    device = next(m10.parameters()).device
    out = {
        "suite": "batching", "model": label, "edits": len(requests), "rounds": args.rounds,
        "device": device_label(device), "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__, "platform": platform.platform(),
        "modules": list(eds["10"].modules), "auto_micro_batch": reports["auto"][-1].micro_batch,
        "turn_s": {k: [x.turn_s for x in v] for k, v in reports.items()},
        "fwd_bwd_s": {k: [x.fwd_bwd_s for x in v] for k, v in reports.items()},
        "median_turn_s": med, "median_fwd_bwd_s": fb,
        "speedup": med["10"] / med["auto"], "fwd_bwd_speedup": fb["10"] / fb["auto"],
        "speedup_grouped": med["10"] / med["10-grouped"],
        "grouped_backward_group": reports["10-grouped"][-1].backward_group,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"{label}, {len(requests)} edits per turn, {out['device']}: micro_batch='auto' used "
          f"{out['auto_micro_batch']} requests per forward; per-turn speed-up "
          f"{out['speedup']:.2f}x (forward+backward {out['fwd_bwd_speedup']:.2f}x), median of "
          f"{args.rounds} alternating rounds; 10 per forward with one backward per turn "
          f"(backward_group='auto' used {out['grouped_backward_group']}): "
          f"{out['speedup_grouped']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

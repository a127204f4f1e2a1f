"""The backbone forward of a turn's requests: padded micro-batches against one packed sequence.

The 100 official-settings requests of ``bench/bench_turn_official.py`` (the first 100 report
edits, length-sorted micro-batches of 10, right padded) go through the embedded model's
backbone (``model.base_model``, no autograd) twice per round, alternating: as the ten padded
micro-batches, and as one ``(1, T)`` sequence of their real tokens with attention kept within
each request (``ultraedit.packing``). Reports the medians, their ratio, the token counts and
the largest relative difference of the last hidden state at the requests' tokens.

    PYTHONPATH=.:python python experiments/packed_forward.py --threads 1 --json experiments/results/packed_forward.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_ROOT, os.path.join(_ROOT, "python"), os.path.join(_ROOT, "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edits", type=int, default=100)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from _common import write_results        # bench/_common.py (bench is first on sys.path)
    from bench_turn_official import requests
    from ultraedit import EditConfig
    from ultraedit.models import load_model
    from ultraedit.packing import PackedLayout, packed
    from ultraedit.turn import prepare_turn

    model, tok = load_model("default")
    _, batches = prepare_turn(tok, requests(a.edits), EditConfig.official(),
                              torch.device("cpu"), None)
    body, layout = model.base_model, PackedLayout(batches)

    def padded_forward():
        with torch.no_grad():
            return [body(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         use_cache=False).last_hidden_state for b in batches]

    def packed_forward():
        with torch.no_grad(), packed(model, layout):
            return body(input_ids=layout.input_ids, position_ids=layout.position_ids,
                        use_cache=False).last_hidden_state

    want = layout.pack(padded_forward())[0]        # the requests' tokens, packed order
    got = packed_forward()[0]
    rel = float((got - want).abs().max() / want.abs().max())
    times = {"padded": [], "packed": []}
    for _ in range(a.rounds):
        for name, fn in (("padded", padded_forward), ("packed", packed_forward)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"command": " ".join(sys.argv), "threads": torch.get_num_threads(),
              "rounds": a.rounds, "edits": a.edits,
              "padded_positions": sum(b["input_ids"].numel() for b in batches),
              "tokens": layout.tokens, "times_s": times, "median_s": med,
              "speedup_packed": med["padded"] / med["packed"], "max_rel_diff": rel}
    print(f"padded {med['padded']:.3f} s ({result['padded_positions']} positions), packed "
          f"{med['packed']:.3f} s ({layout.tokens} tokens): {result['speedup_packed']:.2f}x; "
          f"hidden states agree to {rel:.1e}")
    write_results(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

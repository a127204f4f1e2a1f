"""Would a backward restricted to the tokens that need it make a turn cheaper on the CPU?

A turn's forward/backward needs gradients only at the captured positions (the answer tokens,
or the subject's last token), and those depend only on positions at or after the earliest of
them in the batch (causal attention). So a turn could run the prompt prefix ``[0, s)`` once
without autograd, keeping its attention keys/values (a ``DynamicCache``), and then the suffix
``[s, L)`` with gradients on top of that cache: the same K and G up to rounding, and a backward
over ``L - s`` instead of ``L`` positions. This script measures, on the embedded model, the
100 report-split edits and micro-batches of 10 (one torch thread, alternating rounds, medians):

* ``full``: the editor's capture as it is (``CaptureSession`` + ``batching.forward_backward``);
* ``split``: prefix without autograd + suffix with gradients;
* ``floor``: the backbone's forward without autograd (no projection, no backward);
* ``split_forward``: the prefix and suffix forwards without autograd (what the split costs
  before any backward).

for two settings: the paper's (answer positions, ``mlp.down_proj`` 22-28) and the embedded
preset's (subject positions, ``mlp.down_proj`` 2-6). It checks that both paths capture the same
K and G (relative difference < 1e-4).

    PYTHONPATH=python python experiments/suffix_backward.py --rounds 5 \
        --json experiments/results/suffix_backward.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

SETTINGS = {
    "paper": ("answer", [f"model.layers.{i}.mlp.down_proj" for i in range(22, 29)]),
    "preset": ("subject", [f"model.layers.{i}.mlp.down_proj" for i in range(2, 7)]),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)

    from transformers import DynamicCache

    from ultraedit import EditConfig
    from ultraedit.batching import forward_backward
    from ultraedit.data import offline_facts
    from ultraedit.hooks import CaptureSession
    from ultraedit.models import load_model
    from ultraedit.turn import capture_mask, prepare_turn

    model, tok = load_model("default")
    reqs = [r.as_request() for r in offline_facts(split="report")[:a.edits]]
    out = {"machine": os.uname().nodename, "torch": torch.__version__, "rounds": a.rounds,
           "edits": len(reqs), "settings": {}}
    for setting, (positions, names) in SETTINGS.items():
        cfg = EditConfig.official(positions=positions) if positions == "answer" else \
            EditConfig(positions=positions, micro_batch=10)
        _, batches = prepare_turn(tok, reqs, cfg, torch.device("cpu"), None)
        mods = {n: model.get_submodule(n) for n in names}
        masks = [capture_mask(b, positions) for b in batches]
        starts = [int(m.float().argmax(1).min()) for m in masks]

        def full():
            got = []
            with CaptureSession(model, mods) as cap:
                for b, m in zip(batches, masks):
                    cap.set_mask(m)
                    forward_backward(model, b)
                    got.append(cap.pop())
            return got

        def split():
            got = []
            for b, m, s in zip(batches, masks, starts):
                cache = DynamicCache(config=model.config)
                with torch.no_grad():   # the prefix: no capture hooks, no autograd
                    if s > 0:
                        model.model(input_ids=b["input_ids"][:, :s],
                                    attention_mask=b["attention_mask"][:, :s],
                                    past_key_values=cache, use_cache=True)
                with CaptureSession(model, mods) as cap:
                    cap.set_mask(m[:, s:])
                    answer = (b["labels"] != -100)[:, s:]
                    index = answer.reshape(-1).nonzero().squeeze(1)
                    with torch.enable_grad():
                        h = model.model(input_ids=b["input_ids"][:, s:],
                                        attention_mask=b["attention_mask"],
                                        past_key_values=cache, use_cache=True).last_hidden_state
                        rows = model.lm_head(h.reshape(-1, h.shape[-1]).index_select(0, index))
                        F.cross_entropy(rows.float(), b["labels"][:, s:][answer]).backward()
                    got.append(cap.pop())
            return got

        def floor():
            with torch.no_grad():
                for b in batches:
                    model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                use_cache=False)

        def split_forward():
            with torch.no_grad():
                for b, s in zip(batches, starts):
                    cache = DynamicCache(config=model.config)
                    if s > 0:
                        model.model(input_ids=b["input_ids"][:, :s],
                                    attention_mask=b["attention_mask"][:, :s],
                                    past_key_values=cache, use_cache=True)
                    model.model(input_ids=b["input_ids"][:, s:], attention_mask=b["attention_mask"],
                                past_key_values=cache, use_cache=True)

        worst = max(((x[n][i] - y[n][i]).norm() / x[n][i].norm()).item()
                    for x, y in zip(full(), split()) for n in names for i in range(2))
        assert worst < 1e-4, worst
        fns = {"full": full, "split": split, "floor": floor, "split_forward": split_forward}
        times = {k: [] for k in fns}
        for r in range(a.rounds):
            for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        tokens = sum(b["input_ids"].numel() for b in batches)
        suffix = sum(b["input_ids"][:, s:].numel() for b, s in zip(batches, starts))
        out["settings"][setting] = {
            "positions": positions, "modules": names, "tokens": tokens, "suffix_tokens": suffix,
            "max_rel_diff": worst, "median_s": med, "times_s": times,
            "split_vs_full": med["full"] / med["split"]}
        print(f"{setting}: tokens {tokens}, suffix {suffix}; median s "
              + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
              + f"; full / split = {med['full'] / med['split']:.2f}x; K,G agree to {worst:.1e}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

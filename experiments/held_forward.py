"""Held edits without their backward: a cheaper preset turn?

The preset runs up to 12 capture + solve + apply steps per turn and holds the edits the model
already predicts (``hold_done``: their rows get pseudo-value 0, ``ΔW k = 0``). A held row needs
its key (a forward) but not its output gradient, except for the running statistics; yet every
step runs the forward AND the backward over every request, and by the last steps 80-94 of 100
requests are held. This prototype, from the second step on, splits each micro-batch by the
previous step's predictions: the requests it predicted run a forward only (no autograd; their
keys and whether they are still predicted), the others a forward and backward as before, with
the per-request loss weights of the whole micro-batch (so their gradients are the same). Held
rows are left out of that step's statistics update (no gradient to merge). A held request that
is no longer predicted stays held for that step and runs its backward from the next one.

Scores and turn times of the preset with (``--only held-forward``) or without it (``--only
preset``) on the shared tuning or report records (2 turns of 25); run the two as two processes
at once so that they see the same load. Each turn's ``steps_run`` and ``n_predicted`` are in the
JSON's ``turns``.

    PYTHONPATH=python python experiments/held_forward.py --only preset --json preset.json
    PYTHONPATH=python python experiments/held_forward.py --only held-forward --json held_forward.json
"""
from __future__ import annotations

import argparse

import torch

import _common


def install(editor):
    """Replace ``editor._capture`` and ``editor._update_stats`` by the held-forward versions."""
    from ultraedit.batching import (answer_logits, _predicted, group_parts, request_order,
                                    weighted_forward_backward)
    from ultraedit.hooks import CaptureSession
    from ultraedit.turn import capture_mask

    state = {"held": None, "keep": None}      # held: previous step's predicted (per request)
    real_update_stats = editor._update_stats

    def sub(batch, rows):
        return {k: (v[rows] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == rows.numel()
                    else v) for k, v in batch.items()}

    def capture(batches, meter, first):
        cfg = editor.config
        if first:
            state["held"] = None
        parts = {n: [] for n in editor.modules}
        owners, held_rows, predictions = [], [], []
        loss_sum, n_tokens, offset = 0.0, 0, 0
        with CaptureSession(editor.model, editor.modules) as cap:
            for batch in batches:
                b = batch["labels"].shape[0]
                batch = dict(batch)
                if "request_index" not in batch:
                    batch["request_index"] = torch.arange(offset, offset + b,
                                                          device=batch["labels"].device)
                offset += b
                if "loss_weight" not in batch:   # the micro-batch mean as per-request weights
                    tokens = (batch["labels"] != -100).sum()
                    batch["loss_weight"] = torch.full((b,), 1.0 / float(tokens),
                                                      dtype=torch.float64,
                                                      device=batch["labels"].device)
                if first:
                    n_tokens += int((batch["labels"] != -100).sum())
                req = batch["request_index"]
                was_held = (torch.zeros(b, dtype=torch.bool) if state["held"] is None
                            else state["held"][req.cpu()])
                for hold_part in (False, True):
                    rows = (was_held == hold_part).nonzero().squeeze(1)
                    if rows.numel() == 0:
                        continue
                    part = sub(batch, rows.to(batch["labels"].device))
                    mask = capture_mask(part, cfg.positions)
                    cap.set_mask(mask)
                    if not hold_part:
                        loss, predicted = meter.run(
                            lambda: weighted_forward_backward(editor.model, part))
                        if first:
                            loss_sum += float(loss)
                        for name, kg in cap.pop().items():
                            parts[name] += group_parts(kg, part, mask)
                    else:
                        def forward_only():
                            labels = part["labels"]
                            m = labels != -100
                            with torch.no_grad():
                                rows_ = answer_logits(editor.model, part, m)
                                return _predicted(rows_, labels[m].to(rows_.device), m)
                        predicted = meter.run(forward_only)
                        for name, slot in cap._slots.items():
                            k = slot.keys
                            parts[name].append((k, k.new_zeros(k.shape[0], editor._dims[name][1])))
                            slot.keys = slot.grads = None
                            slot.calls = 0
                    expand = lambda t: t[:, None].expand(mask.shape)[mask]   # noqa: E731
                    owners.append(expand(part["request_index"]))
                    predictions.append((part["request_index"], predicted.to(mask.device)))
                    held_rows.append(expand(torch.full_like(part["request_index"], hold_part,
                                                            dtype=torch.bool)))
        n_req = offset
        now = torch.zeros(n_req, dtype=torch.bool)    # predicted after this step's forward
        for req, pred in predictions:
            now[req.cpu()] = pred.cpu()
        n_predicted = int(now.sum())
        parts, perm = request_order(parts, owners)
        was_held_rows = torch.cat(held_rows).index_select(0, perm.to(held_rows[0].device))
        state["keep"] = ~was_held_rows
        # a held request gets pseudo-value 0 this step whatever it predicts now (it has no
        # gradient); one that is no longer predicted runs its backward from the next step
        hold_rows = (torch.cat([now[o.cpu()] for o in owners]).index_select(0, perm.cpu())
                     | was_held_rows.cpu())
        state["held"] = now
        hold = hold_rows if cfg.hold_done and bool(hold_rows.any()) else None
        return parts, n_predicted, hold, (loss_sum, n_tokens)

    def update_stats(parts, keys, grads):
        keep = state["keep"]
        if keep is None or bool(keep.all()):
            return real_update_stats(parts, keys, grads)
        return real_update_stats(parts, {n: k[keep.to(k.device)] for n, k in keys.items()},
                                 {n: g[keep.to(g.device)] for n, g in grads.items()})

    editor._capture, editor._update_stats = capture, update_stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("preset", "held-forward"), default="held-forward",
                    help="the variant this process runs")
    _common.add_stream_args(ap)
    a = ap.parse_args(argv)
    model, tok, records = _common.load_stream(a)

    from ultraedit import UltraEditor

    editor = UltraEditor(model, tok)
    if a.only == "held-forward":
        install(editor)
    _common.score_and_save(model, tok, records, editor, a, variant=a.only)


if __name__ == "__main__":
    main()

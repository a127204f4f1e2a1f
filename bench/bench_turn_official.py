"""A whole 100-edit turn on the embedded model: the official code's turn against ours.

Takes the path of a checkout of XiaojieGu/UltraEdit (``--official PATH``); its ``ULTRAEDIT``
class is imported from there (``bench_integrations_real.load_official``, its code never enters
this repository) and runs on a copy of the embedded SmolLM2-135M, alternating round by round
with ``UltraEditor(model, tok, config=EditConfig.official(modules=..., lr=...)).edit(requests)``
on a second copy, same 100 offline edits (``offline_facts(split="report")``), same modules.

(a) official turn, what its ``sequential_valid`` does per turn: ``cache(tuples)`` (per
    micro-batch of 10 a forward with ``labels`` — the model's own full-vocabulary loss included —
    its ``cross_entropy`` on the answer tokens and a backward through its forward/backward hooks;
    the normalizer update and the ``torch.save`` of keys and gradients per module),
    ``predict_param_shifts()`` (``torch.load``, normalization in chunks of 128, the d_in x d_in
    solve) and ``edit_model(shifts, False)``. The model is prepared as its ``make_model`` does
    (every parameter ``requires_grad=False`` except the edited weights), its settings are those
    of its config (``lr`` 1e-6, ``token: ans``, ``batch_size`` 128, micro-batches of 10); its
    constructor is bypassed because it only loads a tokenizer from ``config.model.name_or_path``.
    The micro-batches are the same tensors our editor builds (length-sorted, longest first, as
    the official collate does; right padded).
(b) ours: ``UltraEditor.edit`` with ``compat="official"`` (the default
    ``backward_group="auto"``: on a CPU one vocabulary projection and one backward for the
    turn's ten micro-batches, the same update); its ``TurnReport`` split (``fwd_bwd_s``:
    forward + loss + backward; ``editor_s``: everything else) is reported.
(b') with ``--auto``, also ours with ``micro_batch="auto"`` (a third copy of the model): as
    many requests per forward as fit the memory (here the whole turn), the loss weighted so
    that every request keeps the gradient of its micro-batch of 10 (``ultraedit.batching``):
    the same update, fewer and larger forwards.
(c) floor: the same micro-batches through the backbone of our copy without autograd
    (``model.base_model``: no vocabulary projection, no backward, no editor), timed in the same
    rounds: the least model work of a turn run as padded micro-batches, the official code's
    way, so ``official / floor`` (``speedup_bound_forward_only``) bounds the speedup of any
    editor that forwards them so.
(c') packed floor: the same requests' tokens through the backbone as one packed sequence
    (``ultraedit.packing``, what ours runs with the default ``pack="auto"`` on a CPU), no
    autograd: the least model work of a packed turn (``speedup_bound_packed``).

Both start every round from the unedited weights and a fresh normalizer (ours: an untimed
``rollback()``; official: the saved weights copied back), so every round is the first turn of a
fresh run. The first round of each is a warm-up (not timed); its weight updates are compared:
``max_rel_diff`` is the largest over modules of ``||ΔW_ours - ΔW_official|| / ||ΔW_official||``.

    PYTHONPATH=.:python nice python bench/bench_turn_official.py --official /path/UltraEdit \\
        --rounds 7 --json bench/results/turn_official.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace as NS

import torch
import torch.nn as nn

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, _ROOT, os.path.join(_ROOT, "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _common import machine_description, write_results  # noqa: E402
from bench_integrations_real import load_official  # noqa: E402  (stand-ins for its imports)

MODULES = [f"model.layers.{i}.mlp.down_proj" for i in range(22, 29)]   # 7 x down_proj 1536->576
LR = 1e-6          # config/editor/ultraedit.yaml
MICRO = 10         # config/dataset/*.yaml batch_size
EDITOR_CHUNK = 128  # config/editor/ultraedit.yaml batch_size


def requests(n):
    from ultraedit.data import offline_facts

    recs = offline_facts(split="report")
    if len(recs) < n:
        raise SystemExit(f"only {len(recs)} offline report facts, {n} asked")
    # answer positions (the paper's method): no subjects
    return [{"prompt": r.prompt, "target": r.target} for r in recs[:n]]


def weights(model, names):
    mods = dict(model.named_modules())
    return {n: mods[n].weight for n in names}


class OfficialTurn:
    """The official ULTRAEDIT class on ``model``: one turn = cache + predict + apply."""

    def __init__(self, root, model, names, batches, cache_root):
        cls, running_mean_std = load_official(root)
        self.running_mean_std = running_mean_std
        for p in model.parameters():          # its make_model
            p.requires_grad = False
        for w in weights(model, names).values():
            w.requires_grad = True
        cfg = NS(model=NS(edit_modules=list(names), name="llama", name_or_path="unused"),
                 editor=NS(name="ultraedit", lr=LR, batch_size=EDITOR_CHUNK, token="ans",
                           cache_dir=cache_root),
                 dataset=NS(name="zsre", n_edits=sum(b["labels"].shape[0] for b in batches),
                            batch_size=MICRO),
                 num_seq=0, editor_device="cpu", model_device="cpu")
        editor = cls.__new__(cls)               # the constructor only adds a tokenizer
        editor.config, editor.model = cfg, model
        d_out, d_in = next(iter(weights(model, names).values())).shape
        editor.shape_counter = {(d_in, d_out): len(names)}
        self.shape = (d_in, d_out)
        self.editor, self.batches, self.names = editor, batches, names
        self.base = {n: w.detach().clone() for n, w in weights(model, names).items()}

    def reset(self):
        """Unedited weights, no gradients, a fresh normalizer (untimed)."""
        with torch.no_grad():
            for n, w in weights(self.editor.model, self.names).items():
                w.copy_(self.base[n])
                w.grad = None
        d_in, d_out = self.shape
        self.editor.lifelong_normalizer = nn.ModuleDict(
            {str(self.shape): self.running_mean_std(d_in + d_out)})

    def turn(self):
        tuples = [dict(b) for b in self.batches]   # its cache() pops keys of the dicts
        self.editor.cache(tuples)
        shifts = self.editor.predict_param_shifts()
        self.editor.edit_model(shifts, False)
        return shifts


class OurTurn:
    def __init__(self, model, tok, names, reqs, micro_batch=MICRO):
        from ultraedit import EditConfig, UltraEditor

        config = EditConfig.official(modules=list(names), lr=LR, micro_batch=micro_batch)
        self.editor = UltraEditor(model, tok, config=config)
        self.reqs, self.names = reqs, names
        self.base = {n: w.detach().clone() for n, w in weights(model, names).items()}
        self.reports = []

    def reset(self):
        if self.editor.journal.rollback_available:
            self.editor.rollback()

    def turn(self):
        report = self.editor.edit(self.reqs)
        self.reports.append(report)
        return report

    def floor(self, batches):
        """The turn's least model work: a forward without autograd of its micro-batches through
        the backbone (no vocabulary projection, no backward, no editor)."""
        body = self.editor.model.base_model
        with torch.no_grad():
            for b in batches:
                body(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    def packed_floor(self, batches):
        """The backbone forward of the same requests as one packed sequence, no autograd."""
        from ultraedit.packing import PackedLayout, packed

        body, layout = self.editor.model.base_model, PackedLayout(batches)
        with torch.no_grad(), packed(self.editor.model, layout):
            body(input_ids=layout.input_ids, position_ids=layout.position_ids, use_cache=False)

    def deltas(self):
        return {n: (w.detach() - self.base[n]).double()
                for n, w in weights(self.editor.model, self.names).items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help="path of a XiaojieGu/UltraEdit checkout")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of each (>= 5)")
    p.add_argument("--edits", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--auto", action="store_true",
                   help="also time ours with micro_batch='auto' (same update, larger forwards)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from ultraedit.models import load_model
    from ultraedit.turn import prepare_turn
    from ultraedit import EditConfig

    model_off, tok = load_model("default")
    model_ours, _ = load_model("default")
    model_auto = load_model("default")[0] if a.auto else None
    reqs = requests(a.edits)
    # the official collate's micro-batches: length-sorted (longest first), right padded
    _, batches = prepare_turn(tok, reqs, EditConfig.official(), torch.device("cpu"), None)
    batches = [{k: b[k] for k in ("input_ids", "attention_mask", "labels")} for b in batches]

    with tempfile.TemporaryDirectory() as cache_root:
        off = OfficialTurn(a.official, model_off, MODULES, batches, cache_root)
        ours = OurTurn(model_ours, tok, MODULES, reqs)
        runners = [("official", off), ("ours", ours)]
        if a.auto:
            runners.append(("ours_auto", OurTurn(model_auto, tok, MODULES, reqs, "auto")))
        off.reset()
        shifts = off.turn()                                  # warm-up, kept for the check
        diffs = {}
        for name, runner in runners[1:]:
            runner.reset()
            runner.turn()
            deltas = runner.deltas()
            for n in MODULES:
                ref = shifts[n].double().T                    # Linear: W += shiftᵀ
                diffs.setdefault(name, {})[n] = float((deltas[n] - ref).norm() / ref.norm())
            runner.reports.clear()
        ours.floor(batches)
        ours.packed_floor(batches)
        times = {name: [] for name, _ in runners}
        times["floor"], times["packed_floor"] = [], []
        for r in range(a.rounds):
            for name, runner in runners:
                runner.reset()
                t0 = time.perf_counter()
                runner.turn()
                times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ours.floor(batches)
            times["floor"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ours.packed_floor(batches)
            times["packed_floor"].append(time.perf_counter() - t0)
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()),
                  flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    split = {k: statistics.median(getattr(rep, k) for rep in ours.reports)
             for k in ("turn_s", "fwd_bwd_s", "editor_s")}
    result = {
        "machine": machine_description(), "command": " ".join(sys.argv),
        "edits": a.edits, "modules": MODULES, "lr": LR, "micro_batch": MICRO,
        "rounds": a.rounds, "times_s": times, "median_s": med,
        "speedup": med["official"] / med["ours"],
        # no turn of this method can beat a forward of its tokens: the ratio's upper bound
        "speedup_bound_forward_only": med["official"] / med["floor"],
        # ... and of a turn that forwards the requests packed (ours on a CPU)
        "speedup_bound_packed": med["official"] / med["packed_floor"],
        "ours_packed": bool(ours.reports[-1].packed) if ours.reports else None,
        "ours_report_median_s": split,
        "ours_editor_share": split["editor_s"] / split["turn_s"],
        "max_rel_diff_updates": max(diffs["ours"].values()), "rel_diff_updates": diffs["ours"],
        "n_tokens": ours.reports[-1].n_tokens if ours.reports else None,
        # micro-batches per backward (the default "auto": all of the turn's on a CPU)
        "ours_backward_group": ours.reports[-1].backward_group if ours.reports else None,
    }
    if a.auto:
        auto = runners[2][1]
        result["auto"] = {
            "micro_batch": getattr(auto.reports[-1], "micro_batch", None) if auto.reports else None,
            "speedup": med["official"] / med["ours_auto"],
            "speedup_vs_ours_10": med["ours"] / med["ours_auto"],
            "report_median_s": {k: statistics.median(getattr(rep, k) for rep in auto.reports)
                                for k in ("turn_s", "fwd_bwd_s", "editor_s")},
            "max_rel_diff_updates": max(diffs["ours_auto"].values()),
            "rel_diff_updates": diffs["ours_auto"]}
    print(f"official {med['official']:.3f} s, ours {med['ours']:.3f} s: "
          f"{result['speedup']:.2f}x; ours fwd+bwd {split['fwd_bwd_s']:.3f} s, editor "
          f"{split['editor_s']:.3f} s; forward-only floor {med['floor']:.3f} s (bound "
          f"{result['speedup_bound_forward_only']:.2f}x), packed {med['packed_floor']:.3f} s "
          f"(bound {result['speedup_bound_packed']:.2f}x); updates agree to "
          f"{result['max_rel_diff_updates']:.1e}")
    if a.auto:
        print(f"ours, micro_batch='auto' ({result['auto']['micro_batch']} per forward): "
              f"{med['ours_auto']:.3f} s: {result['auto']['speedup']:.2f}x the official turn, "
              f"{result['auto']['speedup_vs_ours_10']:.2f}x ours with 10; updates agree to "
              f"{result['auto']['max_rel_diff_updates']:.1e}")
    write_results(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

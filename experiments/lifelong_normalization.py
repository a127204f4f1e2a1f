"""Prototype: four 2026 stabilizers of lifelong editing, measured as options of the preset.

Each option changes one thing of the embedded model's preset (subject keys in ``down_proj``
2-6, up to 12 held steps, key memory ν = 4, ``:generic`` preserved keys μ = 0.3); the editor is
monkey-patched here, nothing of it ships:

* ``--warmup N`` (StableEdit): before the first turn the running statistics take the rows of
  ``N`` unrelated counterfactual edits, one capture step each, no weight change. The requests
  know nothing of the evaluated relations: ``"<name> is"`` for the names mined from generic
  prompts (``ultraedit.preserve.mined_subjects``), each with the model's own 3-token greedy
  continuation of the *next* name as target.
* ``--whiten`` (StableEdit): the value gradients are fully whitened with their running
  covariance instead of divided by their running standard deviations::

      ĝ = (g - m_g) Σ_g^{-1/2},  Σ_g = Cov(g) + ε tr(Cov(g))/d I   (ε = --whiten-eps)
      V = -lr ||k̂||² ĝ                                            (k̂ as the editor has it)

  (``E||ĝ||² = d`` either way, so lr keeps its meaning); combine with ``--ridge`` for the
  larger ridge. This one now ships as ``EditConfig.whiten`` (``ultraedit.whitening``), which
  the flag sets; the package's turns are bit-identical to this prototype's earlier
  monkey-patched version (checked on two 8-edit turns of the preset). The embedded preset has
  since turned it on (ε = 1e-3): the rows recorded before that as "the preset" are now
  ``--whiten --whiten-eps 0``.
* ``--nas`` (Norm-Anchor Scaling): each row's new module output is rescaled to the unedited
  module's output norm at the same key, ``V' = (O + V) ||O₀|| / ||O + V|| - O`` with ``O = k Wᵀ``
  now and ``O₀ = k W₀ᵀ`` before the first turn.
* ``--memory-growth G``: the key memory's weight grows with the turns, ``ν_t = ν (1 + G t)``
  (``t`` = committed turns).

Scores with ``ultraedit.eval.lifelong_run`` as ``ultraedit run`` does (teacher-forced and
WILD-style, after the last turn):

    PYTHONPATH=python python experiments/lifelong_normalization.py [--warmup 200] [--whiten]
        [--ridge 10] [--nas] [--memory-growth 1] --json OUT
"""
import argparse
import dataclasses
import time

import _common  # puts the repository on sys.path; the stream and its scores
import torch

import ultraedit.editor as editor_mod
import ultraedit.solver as solver_mod
from ultraedit.turn import prepare_turn

CURRENT = {"name": None}


class Editor(editor_mod.UltraEditor):
    nas = False
    memory_growth = 0.0

    def __init__(self, model, tokenizer, config):
        super().__init__(model, tokenizer, config=config)
        self._w0 = {n: m.weight.detach().clone() for n, m in self.modules.items()} if self.nas else {}
        self._nu0 = self.config.memory

    # ---------------------------------------------------------------- warm-up
    def warm_up(self, requests):
        """The statistics take one capture step of ``requests``; the weights stay as they are."""
        _, batches = prepare_turn(self.tokenizer, requests, self.config,
                                  next(self.model.parameters()).device, self._max_length, self.sizer)
        # one forward/backward per micro-batch, unpacked, in the model's own dtype
        parts, *_ = self._capture(batches, 1, editor_mod.TurnMeter(self.model), True, False, None)
        keys, grads = self._rows(parts)
        self._update_stats(parts, keys, grads)

    # ---------------------------------------------------------------- per module
    def _solve_module(self, name, *args):
        CURRENT["name"], CURRENT["editor"] = name, self
        try:
            return super()._solve_module(name, *args)
        finally:
            CURRENT["name"] = None

    def edit(self, requests):
        if self.memory_growth and self._nu0 > 0:
            self.config = dataclasses.replace(
                self.config, memory=self._nu0 * (1 + self.memory_growth * self.turns))
        return super().edit(requests)


_pv = solver_mod.pseudo_values_op


def pseudo_values(keys, grads, mean, std, lr, eps):
    name, ed = CURRENT["name"], CURRENT.get("editor")
    if name is None:
        return _pv(keys, grads, mean, std, lr, eps)
    v = _pv(keys, grads, mean, std, lr, eps)
    if ed.nas:
        w = ed.modules[name].weight.detach().float()
        k = keys.float()
        out, out0 = k @ w.T, k @ ed._w0[name].float().T
        new = out + v.float()
        v = (new * (out0.norm(dim=1, keepdim=True) / new.norm(dim=1, keepdim=True).clamp_min(1e-12))
             - out).to(v.dtype)
    return v


def warmup_requests(model, tok, n):
    """``n`` counterfactual edits on mined generic names (see the module docstring)."""
    from ultraedit.preserve import mined_subjects

    names = mined_subjects(model, tok)[:n]
    conts = []
    with torch.no_grad():
        for name in names:
            ids = tok(f"{name} is", return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=3, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
            conts.append(tok.decode(out[0, ids.shape[1]:]).strip() or "known")
    return [{"prompt": f"{s} is", "target": conts[(i + 1) % len(names)], "subject": s}
            for i, s in enumerate(names)]


def main():
    ap = argparse.ArgumentParser()
    _common.add_stream_args(ap)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--whiten", action="store_true")
    ap.add_argument("--whiten-eps", type=float, default=1e-3)
    ap.add_argument("--ridge", type=float)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--nas", action="store_true")
    ap.add_argument("--memory-growth", type=float, default=0.0)
    args = ap.parse_args()
    from ultraedit import EditConfig

    model, tok, records = _common.load_stream(args)
    solver_mod.pseudo_values_op = pseudo_values
    Editor.nas, Editor.memory_growth = args.nas, args.memory_growth
    overrides = {k: getattr(args, k) for k in ("ridge", "lr") if getattr(args, k) is not None}
    if args.whiten:
        overrides["whiten"] = args.whiten_eps
    ed = Editor(model, tok, config=EditConfig.for_model(model, **overrides))
    warm_s = 0.0
    if args.warmup:
        t0 = time.perf_counter()
        ed.warm_up(warmup_requests(model, tok, args.warmup))
        warm_s = time.perf_counter() - t0
        print(f"warm-up: {args.warmup} requests in {warm_s:.1f} s", flush=True)
    print(vars(args), flush=True)
    _common.score_and_save(model, tok, records, ed, args, warmup_s=warm_s)


if __name__ == "__main__":
    main()

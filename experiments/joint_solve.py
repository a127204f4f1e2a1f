"""Prototype: one least-squares solve over all edited modules instead of one per module.

The editor solves each module on its own keys (``ultraedit.solver``): with ``P_l`` the module's
prior (key memory, preserved keys, ridge) and ``V_l`` its pseudo-values,

    ΔW_l = Y_l (I + K_l Y_l)⁻¹ V_l,    Y_l = P_l⁻¹ K_lᵀ            (independent)

and the edited subjects' residual stream moves by about ``Σ_l V_l``. Here the modules share one
system: the minimum-(P-)norm set of updates whose summed output change on the edited keys is
``V̄ = Σ_l V_l`` (the same total move),

    A = (I + Σ_l K_l Y_l)⁻¹ V̄,    ΔW_l = Y_l A                     (joint)

i.e. ``argmin ||Σ_l K_l ΔW_l - V̄||² + Σ_l tr(ΔW_lᵀ P_l ΔW_l)``. ``crosstalk_joint.py``
measured on the unedited model that this leaves less of an edit on unedited subjects than
independent solves summed (``down_proj`` 2-6, 897 subjects: 0.888 against 1.073). The editor is
subclassed here, nothing of it ships; every other setting is the preset's (or the flags').
Scores with ``ultraedit.eval.lifelong_run`` as ``ultraedit run`` does (teacher-forced and
WILD-style, after the last turn):

    gunzip -c experiments/results/run_offline_records.jsonl.gz > records.jsonl
    PYTHONPATH=python python experiments/joint_solve.py --records records.jsonl --turns 10 \\
        --edits 100 [--modules 'model.layers.[1-9].mlp.down_proj,model.layers.10.mlp.down_proj'] \\
        [--lr 2.5e-5] [--independent] [--cosines] --json OUT
"""
import argparse

import _common  # puts the repository on sys.path; the stream and its scores
import torch

import ultraedit.editor as editor_mod
from ultraedit.solver import Update, _spd_solve, check_updates, step_values
from ultraedit.whitening import step_whiteners


class JointEditor(editor_mod.UltraEditor):
    """``_solve`` replaced by the joint solve of the module docstring (one device, float64).
    ``cosines``: each step appends ``{module: mean over rows of cos(V_l, V̄)}`` (unheld rows)."""

    cosines = None

    def _solve(self, keys, grads, hold, priors, subjects):
        cfg = self.config
        if cfg.protect_mean > 0:
            raise ValueError("the joint prototype has no mean-key row (protect_mean=0)")
        whiteners = (step_whiteners(self.state.whitening, keys, self.stats_key, cfg.whiten)
                     if cfg.whiten > 0 else {})
        ys, vs, inner, target = {}, {}, 0, 0
        for name, k in keys.items():
            prior = self._prior(name, priors, subjects)
            v = step_values(k, grads[name], self.state.stats[self.stats_key(name)], lr=cfg.lr,
                            hold=hold, whitener=whiteners.get(name)).double()
            kd = k.double()
            y = prior.solve(kd.T) if prior is not None else kd.T / cfg.ridge
            ys[name], vs[name] = y, v
            inner, target = inner + kd @ y, target + v
        if self.cosines is not None:
            self.cosines.append({name: self._mean_cosine(vs[name], target, hold) for name in vs})
        inner.diagonal().add_(1.0)
        a = _spd_solve(inner, target, "joint update")
        c = torch.float64 if next(iter(keys.values())).dtype == torch.float64 else torch.float32
        out = {name: Update("dual", a.to(c), y.T.to(keys[name].dtype).contiguous())
               for name, y in ys.items()}
        check_updates(out, cfg.lr, cfg.ridge)
        return out

    @staticmethod
    def _mean_cosine(v, target, hold):
        cos = torch.nn.functional.cosine_similarity(v, target, dim=1)
        return float(cos.mean() if hold is None else cos[~hold.to(cos.device)].mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _common.add_stream_args(ap)
    ap.add_argument("--modules", help="comma-separated module names or patterns (the preset's)")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--independent", action="store_true",
                    help="the shipped per-module solve (the comparison run)")
    ap.add_argument("--cosines", action="store_true",
                    help="print and save each step's mean cos(V_l, sum of V) per module")
    args = ap.parse_args()
    from ultraedit import EditConfig

    model, tok, records = _common.load_stream(args)
    overrides = {}
    if args.lr is not None:
        overrides["lr"] = args.lr
    if args.modules:
        overrides["modules"] = tuple(args.modules.split(","))
    cls = editor_mod.UltraEditor if args.independent else JointEditor
    ed = cls(model, tok, config=EditConfig.for_model(model, **overrides))
    if args.cosines:
        ed.cosines = []
    print(vars(args), flush=True)
    _common.score_and_save(model, tok, records, ed, args,
                           post=(lambda: {"cosines": ed.cosines}) if args.cosines else None)


if __name__ == "__main__":
    main()

"""Prototype: a turn's first step larger than the rest, and fewer steps (a cheaper turn).

The preset runs up to 12 steps of ``lr`` 5e-5; in its tuning turns no request is predicted
after the first four (``n_predicted`` 0, 0, 0, 0, 1, 3, 7, ...), so those steps move every
edit by about the same small amount. This scales the pseudo-values of each turn's first step
by ``--warm`` (the later steps keep ``lr``) and caps the steps at ``--steps``: ``--warm 4
--steps 9`` stands in for the first four steps with one. Monkey-patches the editor; scores with
``ultraedit.eval`` as ``ultraedit run`` does (teacher-forced and WILD-style, after the last turn).

    PYTHONPATH=python python experiments/warm_start.py --warm 4 --steps 9 --json out.json
"""
import argparse

import _common  # puts the repository on sys.path; the stream and its scores

import ultraedit.editor as editor_mod
import ultraedit.solver as solver_mod

STATE = {"first": False, "warm": 1.0, "log": []}


class WarmEditor(editor_mod.UltraEditor):
    def _capture(self, batches, size, meter, first, *rest):
        STATE["first"] = first
        out = super()._capture(batches, size, meter, first, *rest)
        STATE["log"].append(out[1])
        return out


_pv, _wpv = solver_mod.pseudo_values_op, solver_mod.whitened_pseudo_values


def _lr(lr):
    return lr * (STATE["warm"] if STATE["first"] else 1.0)


def warm_pseudo_values(keys, grads, mean, std, lr, eps):
    return _pv(keys, grads, mean, std, _lr(lr), eps)


def warm_whitened_pseudo_values(keys, grads, stats, whitener, lr, eps):
    return _wpv(keys, grads, stats, whitener, _lr(lr), eps)


def main():
    ap = argparse.ArgumentParser()
    _common.add_stream_args(ap)
    ap.add_argument("--warm", type=float, default=1.0, help="the first step's lr multiplier")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    from ultraedit import EditConfig

    model, tok, records = _common.load_stream(args)
    solver_mod.pseudo_values_op = warm_pseudo_values
    solver_mod.whitened_pseudo_values = warm_whitened_pseudo_values   # the preset whitens
    STATE["warm"] = args.warm
    ed = WarmEditor(model, tok, config=EditConfig.for_model(model, steps=args.steps))
    real_edit = ed.edit

    def edit(requests):
        STATE["log"] = []
        rep = real_edit(requests)
        print(f"turn: {rep.turn_s:.1f} s, steps {rep.steps_run}, predicted per step "
              f"{STATE['log']}", flush=True)
        return rep

    ed.edit = edit
    _common.score_and_save(model, tok, records, ed, args)


if __name__ == "__main__":
    main()

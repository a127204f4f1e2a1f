"""Prototype: a per-request step size from the loss (Polyak) instead of one fixed ``lr``.

The preset runs up to 12 steps of ``lr`` 5e-5 per turn; a request becomes predicted after 5 to
12 of them, so most of a turn's forwards and backwards move every edit by the same small step.
Polyak's step size sets each request's step so that the first-order prediction of its loss
reaches ``target``:

    V_r = lr_r · V1_r,   lr_r = clip(c · (L_r - target) / D_r, lr, lr · max_scale)
    D_r = -Σ_modules Σ_{rows of r} ∂L_r/∂out · V1_row        (first-order decrease per unit lr)

(``V1`` = the pseudo-values with lr 1, ``L_r`` = the request's summed answer cross-entropy;
``target`` is per answer token: ``L_r - target · T_r`` for a request of ``T_r`` answer tokens).
With ``--secant`` the decrease per unit step is the one seen, not predicted: a turn's first step
is the preset's, and every later step scales request ``r``'s pseudo-values by
``clip(c · (L_r - target · T_r) / s_r, 1, max_scale)`` with ``s_r`` the drop of ``L_r`` over the
last step divided by that step's scale (a secant; where the loss did not drop, the last scale).
Requests already predicted keep V = 0 (``hold_done``), so the turn still ends when all hold.
Monkey-patches the editor (subject positions only; one backward per micro-batch,
``backward_group = 1``, to read each request's loss; whitened pseudo-values are scaled too);
prints per-step predicted counts and scores with ``ultraedit.eval`` as ``ultraedit run`` does.

    PYTHONPATH=python python experiments/polyak_steps.py --turns 2 --edits 25 --c 1 --json out.json
    PYTHONPATH=python python experiments/polyak_steps.py --secant --target 0.7 --max-scale 8 --json out.json
"""
import argparse

import _common  # puts the repository on sys.path; the stream and its scores
import torch
import torch.nn.functional as F

import ultraedit.batching as batching
import ultraedit.editor as editor_mod
import ultraedit.solver as solver_mod
from ultraedit_kernels import EPS, pseudo_values_op

STASH = {"ce": [], "w": [], "scale": None, "log": []}


def forward_backward(model, batch, margin=0.0):
    labels = batch["labels"]
    mask = labels != -100
    with torch.enable_grad():
        rows = batching.float_rows(batching.answer_logits(model, batch, mask))
        target = labels[mask].to(rows.device)
        owner = mask.nonzero()[:, 0].to(rows.device)
        ce = F.cross_entropy(rows, target, reduction="none")
        if "loss_weight" in batch:
            w = batch["loss_weight"].to(ce)
            loss = (ce * w[owner]).sum()
        else:
            loss = batching._column_mean(ce, mask)
            w = torch.full((mask.shape[0],), 1.0 / int(mask.sum()), dtype=ce.dtype)
        loss.backward()
    per_req = torch.zeros(mask.shape[0], dtype=ce.dtype).index_add_(0, owner.cpu(), ce.detach().cpu())
    order = batch.get("request_index")
    STASH["ce"].append((per_req, mask.sum(1).cpu(), w.detach().cpu(),
                        None if order is None else order.cpu()))
    return loss.detach(), batching._predicted(rows, target, mask, margin)


class PolyakEditor(editor_mod.UltraEditor):
    c = 1.0
    target = 0.0
    max_scale = 64.0
    secant = False

    def _capture(self, batches, size, meter, first, *rest):
        STASH["ce"].clear()
        if first:
            self._prev = None
        out = super()._capture(batches, size, meter, first, *rest)
        per_req, tokens, weights, orders = zip(*STASH["ce"])
        ce, t, w = torch.cat(per_req), torch.cat(tokens), torch.cat(weights)
        if all(o is not None for o in orders):   # forwards by length: back in turn order
            perm = torch.argsort(torch.cat(orders), stable=True)
            ce, t, w = ce[perm], t[perm], w[perm]
        self._ce, self._tokens, self._w = ce.double(), t.double(), w.double()
        STASH["log"].append(out[1])
        return out

    def _solve(self, keys, grads, hold, priors, subjects):
        cfg = self.config
        if self.secant:   # the decrease per unit step observed at the last step, not predicted
            ce, goal = self._ce, self.target * self._tokens
            if self._prev is None:
                scale = torch.ones_like(ce)
            else:
                prev_ce, prev_scale = self._prev
                seen = (prev_ce - ce) / prev_scale
                scale = (self.c * (ce - goal).clamp_min(0) / seen.clamp_min(1e-30)).clamp(
                    1.0, self.max_scale)
                scale = torch.where(seen > 0, scale, prev_scale)
            self._prev = (ce, scale)
            STASH["scale"] = scale
            return super()._solve(keys, grads, hold, priors, subjects)
        n = len(self._ce)
        dec = torch.zeros(n, dtype=torch.float64)
        for name, k in keys.items():
            if k.shape[0] != n:
                raise SystemExit("prototype: subject positions only (one row per request)")
            st = self._stats_for(name, k.device)
            v1 = pseudo_values_op(k, grads[name], st.mean, st.std, 1.0, EPS).double()
            dec += -(grads[name].double() * v1).sum(1) / self._w
        lr_r = self.c * (self._ce - self.target * self._tokens).clamp_min(0) / dec.clamp_min(1e-30)
        scale = (lr_r / cfg.lr).clamp(1.0, self.max_scale)
        scale[dec <= 0] = 1.0
        STASH["scale"] = scale
        return super()._solve(keys, grads, hold, priors, subjects)


def scaled(pseudo_values):
    """``pseudo_values`` (the solver's plain or whitened one) with each request's row scaled by
    ``STASH["scale"]`` (rows: requests, subject positions)."""
    def wrapper(*args):
        v = pseudo_values(*args)
        s = STASH["scale"]
        return v if s is None else v * s.to(v)[:, None]
    return wrapper


def main():
    ap = argparse.ArgumentParser()
    _common.add_stream_args(ap)
    ap.add_argument("--c", type=float, default=1.0)
    ap.add_argument("--target", type=float, default=0.0)
    ap.add_argument("--max-scale", type=float, default=64.0)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--secant", action="store_true",
                    help="the step from the loss decrease seen at the last step (secant)")
    ap.add_argument("--off", action="store_true", help="the preset as is (no Polyak)")
    args = ap.parse_args()
    from ultraedit import EditConfig

    model, tok, records = _common.load_stream(args)
    if not args.off:
        batching.forward_backward = forward_backward
        solver_mod.pseudo_values_op = scaled(solver_mod.pseudo_values_op)
        solver_mod.whitened_pseudo_values = scaled(solver_mod.whitened_pseudo_values)
    PolyakEditor.c, PolyakEditor.target, PolyakEditor.max_scale = args.c, args.target, args.max_scale
    PolyakEditor.secant = args.secant
    # one forward and backward per micro-batch, unpacked: the path whose per-request losses
    # forward_backward above records
    cfg = EditConfig.for_model(model, steps=args.steps, backward_group=1, pack="off")
    ed = (editor_mod.UltraEditor if args.off else PolyakEditor)(model, tok, config=cfg)
    real_edit = ed.edit

    def edit(requests):
        STASH["log"] = []
        rep = real_edit(requests)
        sc = STASH["scale"]
        print(f"turn: {rep.turn_s:.1f} s, steps {rep.steps_run}, predicted per step {STASH['log']}"
              + ("" if sc is None or args.off else
                 f", last scales median {float(sc.median()):.1f} max {float(sc.max()):.1f}"),
              flush=True)
        return rep

    ed.edit = edit
    _common.score_and_save(model, tok, records, ed, args)


if __name__ == "__main__":
    main()

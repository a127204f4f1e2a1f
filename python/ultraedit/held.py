"""Held edits skipped between re-checks (``EditConfig.recheck``).

With ``hold_done`` a turn of ``steps`` holds every request the model already predicts: its row
gets pseudo-value 0 (``ΔW k = 0``) while the others are pushed further. Every step still runs
the forward and the backward of every request, although by the later steps most of them are
held. With ``recheck = K`` a step runs only the requests that did not hold at the last step that
ran them; a held request keeps, for the solve, the key of that step (stale by the updates made
since to the layers before its module) and pseudo-value 0, and it adds nothing to the step's
running statistics or gradient covariance (it has no new gradient). Every ``K``-th step of the
turn (and its first) runs every request again: fresh keys, predictions checked again, and a
request that no longer holds is edited again. ``K = 1`` is every step running every request.
As with ``hold_done`` alone, the turn ends at a step where every request holds (a held one as
it was last checked).

Keys are captured at the subject (``positions="subject"``: one row per request and module),
and ``compat="fixed"`` (statistics per step, not per micro-batch).

Measured on the embedded model with ``K = 4`` (``experiments/turn_speed.md``,
``experiments/tuning.md``): on the ``smollm2-135m`` preset, turns 1.16-1.28x faster with
teacher-forced scores within 0.02 and WILD-style locality 0.068 lower over 400 edits, so that
preset keeps it off; on ``smollm2-135m-lifelong`` over 1,000 edits on three streams, turns 1.32x
faster with every score within 0.017, so that preset uses it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .batching import joined
from .turn import loss_weights

__all__ = ["HeldRows"]

Parts = Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]]


def _subset(batch: Dict[str, torch.Tensor], rows: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The rows ``rows`` (1-D long) of every per-request tensor of a micro-batch."""
    b = batch["labels"].shape[0]
    return {k: (v.index_select(0, rows.to(v.device))
                if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == b else v)
            for k, v in batch.items()}


class HeldRows:
    """One turn's bookkeeping of ``recheck = every``: which requests a step runs
    (:meth:`batches`) and the step's rows of all requests (:meth:`merge`, :meth:`fresh_rows`).

    ``every = 0``: off (every step runs every request; the methods return their inputs).
    ``held`` (n bool): the requests predicted at the last step that ran them; ``keys``: each
    module's last key of every request (n x d_in); ``fresh``: the requests this step ran (None:
    all of them)."""

    def __init__(self, n_requests: int, every: int):
        self.n, self.every = n_requests, every
        self.held = torch.zeros(n_requests, dtype=torch.bool)
        self.keys: Dict[str, torch.Tensor] = {}
        self.fresh: Optional[torch.Tensor] = None
        self._indexed: Optional[List[Dict[str, torch.Tensor]]] = None

    def _with_request_weights(self, batches):
        """The turn's micro-batches with ``request_index`` and per-request ``loss_weight``
        (:func:`ultraedit.turn.loss_weights`: the micro-batch mean's), made once per turn, so
        that a subset of a micro-batch's requests keeps their gradients."""
        if self._indexed is None:
            out, offset = [dict(b) for b in batches], 0
            if "loss_weight" not in out[0]:   # the plain micro-batch means, in the given order
                loss_weights(out, out[0]["labels"].shape[0])
            for b in out:
                size = b["labels"].shape[0]
                if "request_index" not in b:
                    b["request_index"] = torch.arange(offset, offset + size,
                                                      device=b["labels"].device)
                offset += size
            self._indexed = out
        return self._indexed

    def batches(self, batches: List[Dict[str, torch.Tensor]], step: int):
        """The micro-batches step ``step`` (from 0) runs: all of them at the first step, at every
        ``every``-th and while nothing holds; else each one's requests that do not hold, with
        ``request_index`` and per-request ``loss_weight`` (so each request keeps its gradient)."""
        if (not self.every or step == 0 or (step + 1) % self.every == 0
                or not bool(self.held.any())):
            self.fresh = None
            return batches
        out = []
        for batch in self._with_request_weights(batches):
            rows = (~self.held[batch["request_index"].cpu()]).nonzero().squeeze(1)
            if rows.numel():
                out.append(_subset(batch, rows))
        self.fresh = ~self.held
        return out

    def merge(self, parts: Parts, n_predicted: int, hold: Optional[torch.Tensor]):
        """``(parts, n_predicted, hold)`` of every request from the step's own (rows of the
        requests it ran, in request order), each module's rows as one ``(K, G)`` pair: held
        requests' rows are their last keys with zero gradients, and they count as predicted."""
        if not self.every:
            return parts, n_predicted, hold
        pairs = {name: joined(p) for name, p in parts.items()}
        if self.fresh is None:   # every request ran: remember their keys and predictions
            self.keys = {name: k for name, (k, _) in pairs.items()}
            self.held = (torch.zeros(self.n, dtype=torch.bool) if hold is None
                         else hold.cpu().clone())
            return {name: [pair] for name, pair in pairs.items()}, n_predicted, hold
        index = self.fresh.nonzero().squeeze(1)
        held = self.held.clone()
        if hold is not None:
            held[index] = hold.cpu()
        merged: Parts = {}
        for name, (k_ran, g_ran) in pairs.items():
            if k_ran.shape[0] != index.numel():
                raise RuntimeError(f"recheck: {k_ran.shape[0]} rows captured for {index.numel()} "
                                   f"requests in {name!r}; it needs one row per request")
            keys = self.keys[name].clone()
            keys[index.to(keys.device)] = k_ran
            grads = g_ran.new_zeros(self.n, g_ran.shape[1])
            grads[index.to(grads.device)] = g_ran
            merged[name], self.keys[name] = [(keys, grads)], keys
        self.held = held
        return merged, int(held.sum()), held

    def fresh_rows(self, parts: Parts, keys: Dict[str, torch.Tensor],
                   grads: Dict[str, torch.Tensor]):
        """``(parts, keys, grads)`` restricted to the requests this step ran (the rows that
        enter the running statistics)."""
        if self.fresh is None:
            return parts, keys, grads
        keys = {n: k[self.fresh.to(k.device)] for n, k in keys.items()}
        grads = {n: g[self.fresh.to(g.device)] for n, g in grads.items()}
        return {n: [(keys[n], grads[n])] for n in keys}, keys, grads

"""The editor's lifelong state and the turn journal that makes every turn a transaction.

:class:`EditorState` is everything a turn reads and commits besides the weights:

* ``stats``: the normalizer, ``{stats key: RunningStats}`` of ``z = [k ; g]``, keyed
  ``"shape:<d_in>x<d_out>"`` (one per weight shape, the paper) or ``"module:<name>"``;
* ``memory``: ``{module: KeyMemory}``, ``M = Σ_t K_tᵀK_t`` over committed turns' keys;
* ``whitening``: ``{stats key: GradientCovariance}`` of the output gradients (``whiten > 0``,
  ``ultraedit.whitening``), updated with the statistics;
* ``preserved``: ``{module: PreservedKeys}``, captured once at construction (read-only);
* ``turns``: committed turns.

:class:`TurnJournal` owns the edited weights' record: ``base`` (``W0``, the weights before the
first edit), in **accumulate** mode the fp32 ``delta`` ``Δ = Σ_t ΔW_t`` with
``W = round(W0 + Δ)`` written once per step (updates far below bf16's rounding step add up
instead of vanishing), and a bounded history of turn records. :meth:`TurnJournal.transaction`
snapshots the state and the weights (or Δ) before a turn; if anything fails inside, both are
restored bit for bit before the error propagates; on success the snapshot becomes the turn's
rollback entry. :meth:`TurnJournal.rollback` restores the last turns' snapshots.

Weights are read and written through ``ultraedit.placement.WeightSlot``: ``module.weight`` in
place, or, for a module that accelerate offloads to CPU RAM or disk, the values its hook loads
(base, Δ and history then live on the CPU).

Memory: ``base`` is one copy of the edited weights; ``delta`` one float32 copy when
accumulating; each history entry one more copy (weight dtype, or float32 when accumulating)
plus the statistics, key memories and gradient covariances. ``device="cpu"`` keeps all of it
off the accelerator.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Union

import torch

__all__ = ["EditorState", "KeyMemory", "TurnJournal", "TurnRecord", "RollbackError",
           "reconstruct", "dense_update"]

_BLOCK_BYTES = 64 << 20
# "auto" accumulates for these weights: bf16/fp16 lose small updates to rounding, and for
# float64 weights W - W0 cannot always be stored so that W0 + Δ rounds back to W exactly
_ACCUMULATE_AUTO = (torch.bfloat16, torch.float16, torch.float64)


class RollbackError(ValueError):
    """More turns were asked to be rolled back than the history keeps."""


# ---------------------------------------------------------------------- key memory
class KeyMemory:
    """``gram = Σ kkᵀ`` (d x d, float64) and ``count`` (rows) of the keys of committed turns."""

    def __init__(self, dim: int, device=None):
        if int(dim) != dim or dim < 1:
            raise ValueError(f"KeyMemory dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        return self.gram.device

    def add(self, keys: torch.Tensor) -> "KeyMemory":
        """Add the rows of ``keys`` (n x d) in place."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be n x {self.dim}, got {tuple(keys.shape)}")
        k = keys.detach().to(device=self.device, dtype=torch.float64)
        self.gram.addmm_(k.T, k)
        self.count += k.shape[0]
        return self

    def clone(self) -> "KeyMemory":
        out = KeyMemory.__new__(KeyMemory)
        out.dim, out.gram, out.count = self.dim, self.gram.clone(), self.count.clone()
        return out

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"gram": self.gram, "count": self.count}

    def load_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        gram, count = sd["gram"], sd["count"]
        if tuple(gram.shape) != (self.dim, self.dim):
            raise ValueError(f"key memory of shape {tuple(gram.shape)} does not fit dim {self.dim}")
        if count.numel() != 1 or not bool(torch.isfinite(gram).all()) or float(count) < 0:
            raise ValueError("key memory holds NaN/Inf values or a negative count")
        self.gram = gram.to(device=self.device, dtype=torch.float64).clone()
        self.count = count.to(device=self.device, dtype=torch.float64).clone().reshape(())

    def __repr__(self) -> str:
        return f"KeyMemory(dim={self.dim}, rows={int(self.count)})"


# ---------------------------------------------------------------------- the state
class EditorState:
    """Statistics, key memories, preserved keys and the turn count (see the module docstring)."""

    def __init__(self):
        self.stats: Dict[str, Any] = {}
        self.memory: Dict[str, KeyMemory] = {}
        self.whitening: Dict[str, Any] = {}
        self.preserved: Dict[str, Any] = {}
        self.turns = 0

    def snapshot(self) -> Dict[str, Any]:
        """Copies of everything a turn may change (the preserved keys never change)."""
        return {"stats": {k: v.clone() for k, v in self.stats.items()},
                "memory": {k: v.clone() for k, v in self.memory.items()},
                "whitening": {k: v.clone() for k, v in self.whitening.items()},
                "turns": self.turns}

    def restore(self, snap: Dict[str, Any]) -> None:
        """Back to :meth:`snapshot`'s contents (the dicts keep their identity)."""
        for mine, saved in ((self.stats, snap["stats"]), (self.memory, snap["memory"]),
                            (self.whitening, snap["whitening"])):
            mine.clear()
            mine.update({k: v.clone() for k, v in saved.items()})
        self.turns = snap["turns"]

    def state_dict(self) -> Dict[str, Any]:
        """``{"turns", "stats": {key: {count, mean, m2}}, "compat": {key: str},
        "memory": {module: {gram, count}}, "whitening": {key: {count, sum, outer}},
        "preserved": {module: {keys, owners}}}`` (tensors and plain values; each part is its
        object's own ``state_dict()``)."""
        return {"turns": self.turns,
                "stats": {k: dict(v.state_dict()) for k, v in self.stats.items()},
                "compat": {k: v.compat for k, v in self.stats.items()},
                "memory": {k: dict(v.state_dict()) for k, v in self.memory.items()},
                "whitening": {k: dict(v.state_dict()) for k, v in self.whitening.items()},
                "preserved": {k: v.state_dict() for k, v in self.preserved.items()}}

    def load_state_dict(self, sd: Dict[str, Any], devices: Dict[str, torch.device]) -> None:
        """Replace the state with ``sd`` (:meth:`state_dict`); ``devices`` maps each stats key
        and module name to its device. Raises ValueError before changing anything."""
        from ultraedit_kernels import RunningStats

        from .preserve import PreservedKeys
        from .whitening import GradientCovariance

        stats, memory, whitening, preserved = {}, {}, {}, {}
        for key, parts in sd.get("stats", {}).items():
            if key not in devices:
                raise ValueError(f"statistics {key!r} belong to no edited module")
            st = RunningStats(parts["mean"].numel(), compat=sd.get("compat", {}).get(key, "fixed"),
                              device=devices[key])
            st.load_state_dict(parts)
            stats[key] = st
        for name, parts in sd.get("memory", {}).items():
            if name not in devices:
                raise ValueError(f"key memory {name!r} belongs to no edited module")
            mem = KeyMemory(parts["gram"].shape[0], device=devices[name])
            mem.load_state_dict(parts)
            memory[name] = mem
        for key, parts in sd.get("whitening", {}).items():
            if key not in devices:
                raise ValueError(f"gradient covariance {key!r} belongs to no edited module")
            cov = GradientCovariance(parts["sum"].numel(), device=devices[key])
            cov.load_state_dict(parts)
            whitening[key] = cov
        for name, parts in sd.get("preserved", {}).items():
            if name not in devices:
                raise ValueError(f"preserved keys {name!r} belong to no edited module")
            preserved[name] = PreservedKeys.from_state_dict(parts, devices[name])
        for mine, new in ((self.stats, stats), (self.memory, memory), (self.whitening, whitening),
                          (self.preserved, preserved)):
            mine.clear()
            mine.update(new)
        self.turns = int(sd.get("turns", 0))


# ---------------------------------------------------------------------- weights
def reconstruct(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(base.to(c) + delta.to(c)).to(dtype)`` with ``c`` = float64 if ``delta`` is float64 else
    float32, in row blocks (bounded temporaries). Writes into ``out`` when given (any device)."""
    c = torch.float64 if delta.dtype == torch.float64 else torch.float32
    if out is None:
        out = torch.empty(base.shape, dtype=dtype, device=delta.device)
    rows = max(1, _BLOCK_BYTES // (8 * max(1, base.shape[-1])))
    for s in range(0, base.shape[0], rows):
        blk = base[s:s + rows].to(device=delta.device, dtype=c) + delta[s:s + rows].to(c)
        out[s:s + rows].copy_(blk.to(dtype))
    return out


def dense_update(layout: str, k: torch.Tensor, method: str, u: torch.Tensor) -> torch.Tensor:
    """The float64 value of one module update in the weight's layout (for measurements).

    ``method="dual"``: ``u`` is the factor A, ΔW = Kᵀ A; ``"primal"``: ``u`` is ΔW (d_in x d_out).
    Linear weights are d_out x d_in (ΔWᵀ), Conv1D weights d_in x d_out (ΔW).
    """
    linear = layout == "linear"
    if method == "dual":
        return u.double().T @ k.double() if linear else k.double().T @ u.double()
    return u.double().T if linear else u.double()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class TurnRecord:
    """What a turn changes, as it was before: the state's snapshot and, per module, the weight
    (or, accumulating, Δ; None = no Δ yet)."""

    state: Dict[str, Any]
    saved: Dict[str, Optional[torch.Tensor]] = field(default_factory=dict)


def storage_device(device) -> torch.device:
    """``delta_device`` as a device that can hold the base copy, Δ and the history; a
    ``ValueError`` naming the problem otherwise (before any copy is made)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"delta_device={device!r} is not a device ({err})") from None
    if dev.type == "meta":
        raise ValueError("delta_device='meta' holds no values: the base copy, Δ and the "
                         "rollback history need a real device (e.g. 'cpu')")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"delta_device={device!r}: CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"delta_device={device!r}: there are {torch.cuda.device_count()} CUDA "
                         f"devices")
    return dev


class TurnJournal:
    """Applies updates to the edited modules; keeps base, fp32 Δ and the rollback history.

    Args:
        modules: ``{name: module}`` (Linear / GPT-2 Conv1D), in the editor's order.
        layouts: ``{name: "linear" | "conv1d"}``.
        accumulate: ``"auto"`` (on when any edited weight is bf16, fp16 or float64), True or False.
        device: where base, Δ and history live: None = each module's weight device.
        history: how many turns :meth:`rollback` can undo (0 disables rollback).
        slots: ``{name: ultraedit.placement.WeightSlot}``, where each weight's values are read
            and written (offloaded modules); None = ``module.weight`` itself.
    """

    def __init__(self, modules: Dict[str, torch.nn.Module], layouts: Dict[str, str],
                 accumulate: Union[str, bool] = "auto", device=None, history: int = 1,
                 slots: Optional[Dict[str, Any]] = None):
        from .placement import WeightSlot

        if accumulate not in ("auto", True, False):
            raise ValueError(f"accumulate must be 'auto', True or False, got {accumulate!r}")
        if int(history) != history or history < 0:
            raise ValueError(f"history must be a non-negative integer, got {history!r}")
        self.modules = dict(modules)
        self.layouts = dict(layouts)
        self.slots = {n: (slots or {}).get(n) or WeightSlot(m, n) for n, m in self.modules.items()}
        if accumulate == "auto":
            accumulate = any(s.dtype in _ACCUMULATE_AUTO for s in self.slots.values())
        self.accumulate = bool(accumulate)
        wide = [n for n, s in self.slots.items() if s.dtype == torch.float64]
        if wide and not self.accumulate:
            warnings.warn(f"float64 weights edited with accumulate=False ({wide[0]!r}): W - W0 "
                          f"may not rebuild W exactly, so save_state and export_delta can fail; "
                          f"accumulate='auto' (True) keeps a record that always does",
                          stacklevel=3)
        if self.accumulate:   # each module's W = round(W0 + Δ) would overwrite the other's
            owners: Dict[Any, str] = {}
            for name, slot in self.slots.items():
                if not slot.live:
                    continue
                ptr = slot.read().data_ptr()
                if ptr in owners:
                    raise ValueError(f"modules {owners[ptr]!r} and {name!r} share one weight "
                                     f"tensor; edit one of them")
                owners[ptr] = name
        self.device = None if device is None else storage_device(device)
        self.history = int(history)
        self._records: "collections.deque[TurnRecord]" = collections.deque(maxlen=self.history)
        self.base: Dict[str, torch.Tensor] = {n: self._copy(self.weight(n)) for n in
                                              self.modules}
        self.delta: Dict[str, Optional[torch.Tensor]] = {n: None for n in self.modules}
        self.base_turn = 0  # editor turn at which ``base`` was taken (non-zero after a resume)

    def _dev(self, name: str) -> torch.device:
        return self.device if self.device is not None else self.slots[name].device

    def weight(self, name: str) -> torch.Tensor:
        """The current values of a module's weight (``module.weight.data``, or the offloaded
        values the hook loads: ``ultraedit.placement``)."""
        return self.slots[name].read()

    def _copy(self, weight: torch.Tensor) -> torch.Tensor:
        dev = self.device if self.device is not None else weight.device
        return weight.detach().to(device=dev, copy=True)

    @property
    def rollback_available(self) -> int:
        """How many turns :meth:`rollback` can undo now."""
        return len(self._records)

    # ------------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def transaction(self, state: EditorState) -> Iterator[TurnRecord]:
        """Snapshot ``state`` and every module; restore both if the block raises, else keep the
        snapshot as the turn's rollback entry."""
        if self.accumulate:
            self._check_untouched()
        record = TurnRecord(state=state.snapshot(),
                            saved={n: self._snapshot(n) for n in self.modules})
        try:
            yield record
        except BaseException:
            self._restore(record, state)
            raise
        if self.history:
            self._records.append(record)

    def _check_untouched(self) -> None:
        """Accumulating, a turn writes ``W = round(W0 + Δ)``: a weight changed outside the editor
        since the editor last wrote it would be silently overwritten. Refuse instead (compared in
        row blocks, no full-size temporary)."""
        for name in self.modules:
            weight = self.weight(name).detach()
            base, d = self.base[name], self.delta[name]
            rows = max(1, _BLOCK_BYTES // (8 * max(1, base.shape[-1])))
            for start in range(0, base.shape[0], rows):
                part = base[start:start + rows]
                if d is not None:
                    part = reconstruct(part, d[start:start + rows], weight.dtype)
                if not torch.equal(weight[start:start + rows],
                                   part.to(device=weight.device, dtype=weight.dtype)):
                    raise ValueError(
                        f"module {name!r}: its weight changed outside the editor since the "
                        f"editor last wrote it; this editor keeps {weight.dtype} weights as the "
                        f"base plus a float32 delta and would overwrite that change. Build a new "
                        f"editor on the changed model")

    def _snapshot(self, name: str) -> Optional[torch.Tensor]:
        if self.accumulate:
            d = self.delta[name]
            return None if d is None else d.clone()
        return self._copy(self.weight(name))

    def apply(self, updates: Dict[str, Any]) -> None:
        """Add every module's update (``solver.Update``) in place; checked finite by the caller.

        Linear ``W += (keysᵀA)ᵀ``, Conv1D ``W += keysᵀA`` (dual); ``W += ΔWᵀ`` / ``ΔW``
        (primal); accumulating, the same is added to Δ and ``W = round(W0 + Δ)`` is written.
        Only inside :meth:`transaction`, which undoes a partial application.
        """
        from .solver import first_non_finite

        with torch.no_grad():
            written = {name: self._apply_module(name, upd.keys, upd.kind, upd.tensor)
                       for name, upd in updates.items()}
        # A finite shift can still overflow the weight's dtype (float16 tops out at 65504): such
        # a step is refused like a non-finite shift, and the transaction puts every module back.
        bad = first_non_finite(written)
        if bad is not None:
            raise FloatingPointError(
                f"module {bad!r}: the edited weight overflows {written[bad].dtype} (is lr too "
                f"large?); nothing was changed")

    def _apply_module(self, name: str, k: torch.Tensor, method: str,
                      u: torch.Tensor) -> torch.Tensor:
        """Add one module's update in place; returns its weight as written."""
        from ultraedit_kernels import apply_shift_op

        slot = self.slots[name]
        weight = slot.read()
        linear = self.layouts[name] == "linear"
        if not self.accumulate:
            dev = weight.device
            if method == "dual":
                apply_shift_op(weight, k.to(dev), u.to(dev), linear)
            else:  # u = ΔW (d_in x d_out); Linear stores W as d_out x d_in
                weight.add_((u.T if linear else u).to(device=dev, dtype=weight.dtype))
            if not slot.live:
                slot.write(weight)
            return weight
        dev = self._dev(name)
        c = _acc_dtype(weight.dtype)
        d = self.delta[name]
        if d is None:
            d = torch.zeros(weight.shape, dtype=c, device=dev)
        u = u.to(device=dev, dtype=c)  # ``d`` changes in place: the turn's snapshot is a clone
        if method == "primal":
            d.add_(u.T if linear else u)
        else:
            k = k.to(device=dev, dtype=c)
            if linear:
                d.addmm_(u.T, k)        # (d_out x d_in) += Aᵀ K
            else:
                d.addmm_(k.T, u)        # (d_in x d_out) += Kᵀ A
        self.delta[name] = d
        reconstruct(self.base[name], d, weight.dtype, out=weight)
        if not slot.live:
            slot.write(weight)
        return weight

    def _write_from(self, name: str, saved: Optional[torch.Tensor]) -> None:
        slot = self.slots[name]
        weight = slot.read()
        if self.accumulate:
            self.delta[name] = None if saved is None else saved.clone()
            if saved is None:
                weight.copy_(self.base[name])
            else:
                reconstruct(self.base[name], saved, weight.dtype, out=weight)
        else:
            weight.copy_(saved)
        if not slot.live:
            slot.write(weight)

    def _restore(self, record: TurnRecord, state: EditorState) -> None:
        with torch.no_grad():
            for name, saved in record.saved.items():
                self._write_from(name, saved)
        state.restore(record.state)

    # ------------------------------------------------------------------ rollback
    def rollback(self, state: EditorState, turns: int = 1) -> None:
        """Restore weights and ``state`` of before the last ``turns`` turns, bit for bit."""
        if isinstance(turns, bool) or int(turns) != turns or turns < 1:
            raise ValueError(f"turns must be a positive integer, got {turns!r}")
        if turns > len(self._records):
            held = len(self._records)
            why = (f"history={self.history}; pass UltraEditor(..., history=n) to keep more"
                   if held == self.history else
                   "it holds the turns made since the editor was built, its state was loaded "
                   "or its history cleared, less those rolled back; a saved state does not keep "
                   "the history")
            raise RollbackError(f"cannot roll back {turns} turn(s): the history holds {held} "
                                f"({why})")
        for _ in range(int(turns)):
            # restored, then dropped: a restore that fails keeps its entry for another try
            self._restore(self._records[-1], state)
            self._records.pop()

    def clear_history(self) -> None:
        self._records.clear()

    # ------------------------------------------------------------------ deltas
    def current_delta(self, name: str) -> torch.Tensor:
        """``Δ`` of a module in weight layout such that ``reconstruct(base, Δ, W.dtype) == W``.

        Accumulating: the float32 accumulator itself. Otherwise ``W - W0`` computed in float64,
        stored as float32 when that reconstructs ``W`` exactly (checked), else as float64.
        """
        weight = self.weight(name).detach()
        base = self.base[name]
        if self.accumulate:
            d = self.delta[name]
            return d if d is not None else torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype),
                                                        device=base.device)
        d64 = weight.to(device=base.device, dtype=torch.float64) - base.double()
        candidates = [d64.float(), d64] if weight.dtype != torch.float64 else [d64]
        for d in candidates:
            if torch.equal(reconstruct(base, d, weight.dtype).to(weight.device), weight):
                return d
        raise RuntimeError(f"module {name!r}: W - W0 does not reconstruct W exactly (non-finite "
                           f"weights, or float64 weights edited with accumulate=False: use "
                           f"accumulate=True to export or save their deltas)")

    def set_state(self, base: Dict[str, torch.Tensor], delta: Dict[str, Optional[torch.Tensor]],
                  base_turn: int) -> None:
        """Replace base and Δ (used when a saved state is loaded); clears the history."""
        for name in self.modules:
            self.base[name] = base[name].detach().to(self._dev(name), copy=True)
            d = delta.get(name)
            # a copy: a tensor read from a file may sit at an address whose alignment changes
            # the GEMM's summation order, and the resumed turns must equal uninterrupted ones
            self.delta[name] = None if (d is None or not self.accumulate) else \
                d.to(device=self._dev(name), dtype=_acc_dtype(base[name].dtype), copy=True)
        self.base_turn = int(base_turn)
        self._records.clear()

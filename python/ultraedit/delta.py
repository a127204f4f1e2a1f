"""Accumulated weight deltas of the edited modules: fp32 accumulation, rollback, export.

:class:`DeltaTracker` owns everything the editor needs to change weights safely (DESIGN.md §2,
"Precision of lifelong accumulation"). For every edited module it keeps

* ``base``: a copy of the weight before the first edit (``W0``, in the weight's dtype);
* in **accumulate** mode (default for bf16/fp16 weights) ``delta``: the accumulated update
  ``Δ = Σ_t ΔW_t`` in float32 (float64 for float64 weights), in the layout of ``module.weight``.
  A turn adds its rank-N update to ``Δ`` (``Δ += Aᵀ K`` for Linear, ``Δ += Kᵀ A`` for Conv1D)
  and writes ``W = round(W0 + Δ)`` once, so updates far below the weight's rounding step
  (96.5% of a turn's ΔW on bf16 at the paper's lr, DESIGN.md §6) add up instead of vanishing.
  Without accumulation a turn is ``apply_shift_(W, K, A)`` in place (the fp32 default).
* a bounded **history** of per-turn snapshots (``history`` turns) taken just before each module
  is changed: the weight (or, when accumulating, ``Δ``) and the normalizer statistics.
  ``rollback(turns)`` restores them bit for bit.

A turn is **transactional**: the snapshot of a module is taken before it changes, and if anything
fails while the turn's updates are being applied (an out-of-memory, a bad factor) every module
already changed is restored from its snapshot before the error propagates. The statistics are
committed by the editor only after :meth:`DeltaTracker.apply_turn` returns.

Memory: ``base`` is one copy of the edited modules' weights (their dtype); ``delta`` one float32
copy when accumulating; each history entry one more copy (weight dtype, or float32 when
accumulating). ``device="cpu"`` keeps all of it off the accelerator.

Export: :func:`export_delta` writes ``ΔW`` per module (weight layout) as safetensors plus a JSON
manifest; :func:`apply_delta` adds it to a fresh copy of the base model with
``W = (W0.to(c) + Δ.to(c)).to(W.dtype)`` (``c`` = float64 if Δ is float64 else float32), the
same rounding the editor uses, so the result equals the edited weights bit for bit.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch

__all__ = ["DeltaTracker", "export_delta", "apply_delta", "reconstruct", "RollbackError",
           "check_captured"]

_BLOCK_BYTES = 64 << 20
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class RollbackError(ValueError):
    """More turns were asked to be rolled back than the history keeps."""


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def check_captured(name: str, keys: torch.Tensor, grads: torch.Tensor) -> None:
    """Raise FloatingPointError naming the module if its captured keys or gradients hold NaN/Inf."""
    for what, t in (("inputs (keys)", keys), ("output gradients", grads)):
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise FloatingPointError(
                f"module {name!r}: the captured {what} contain {bad} NaN/Inf value(s) (a NaN/Inf "
                f"loss or activation in the forward/backward); the turn was refused and nothing "
                f"was changed")


@dataclass
class _TurnRecord:
    turn: int                                   # editor.turns before the turn
    stats: Dict[str, Any]                       # stats key -> RunningStats clone (before)
    saved: Dict[str, Optional[torch.Tensor]] = field(default_factory=dict)  # name -> snapshot


def dense_update(layout: str, k: torch.Tensor, method: str, u: torch.Tensor) -> torch.Tensor:
    """The float64 value of one module update in the weight's layout (for measurements).

    ``method="dual"``: ``u`` is the factor A, ΔW = Kᵀ A; ``"primal"``: ``u`` is ΔW (d_in x d_out).
    Linear weights are d_out x d_in (ΔWᵀ), Conv1D weights d_in x d_out (ΔW).
    """
    linear = layout == "linear"
    if method == "dual":
        return u.double().T @ k.double() if linear else k.double().T @ u.double()
    return u.double().T if linear else u.double()


class DeltaTracker:
    """Applies a turn's updates to the edited modules; keeps base, fp32 Δ and the history.

    Args:
        modules: ``{name: module}`` (Linear / GPT-2 Conv1D), in the editor's order.
        layouts: ``{name: "linear" | "conv1d"}``.
        accumulate: ``"auto"`` (on when any edited weight is bf16/fp16), True or False.
        device: where base, Δ and history live: None = each module's weight device, or a device
            (e.g. ``"cpu"``).
        history: how many turns :meth:`rollback` can undo (0 disables rollback; each kept turn
            costs one copy of the edited weights, float32 when accumulating).
    """

    def __init__(self, modules: Dict[str, torch.nn.Module], layouts: Dict[str, str],
                 accumulate: Union[str, bool] = "auto", device=None, history: int = 1):
        if accumulate not in ("auto", True, False):
            raise ValueError(f"accumulate must be 'auto', True or False, got {accumulate!r}")
        if int(history) != history or history < 0:
            raise ValueError(f"history must be a non-negative integer, got {history!r}")
        self.modules = dict(modules)
        self.layouts = dict(layouts)
        if accumulate == "auto":
            accumulate = any(m.weight.dtype in _LOW_PRECISION for m in self.modules.values())
        self.accumulate = bool(accumulate)
        self.device = None if device is None else torch.device(device)
        self.history = int(history)
        self._records: "collections.deque[_TurnRecord]" = collections.deque(maxlen=self.history)
        self.base: Dict[str, torch.Tensor] = {n: self._copy(m.weight) for n, m in
                                              self.modules.items()}
        self.delta: Dict[str, Optional[torch.Tensor]] = {n: None for n in self.modules}
        self.base_turn = 0  # editor turn at which ``base`` was taken (non-zero after a resume)

    # ------------------------------------------------------------------ helpers
    def _dev(self, name: str) -> torch.device:
        return self.device if self.device is not None else self.modules[name].weight.device

    def _copy(self, weight: torch.Tensor) -> torch.Tensor:
        dev = self.device if self.device is not None else weight.device
        return weight.detach().to(device=dev, copy=True)

    @property
    def rollback_available(self) -> int:
        """How many turns :meth:`rollback` can undo now."""
        return len(self._records)

    # ------------------------------------------------------------------ the turn
    def apply_turn(self, editor, names: Iterable[str], keys: Dict[str, torch.Tensor],
                   updates: Dict[str, Any]) -> None:
        """Add every module's turn update, all or nothing.

        ``updates[name]`` is the dual factor ``A`` (N x d_out, ``ΔW = Kᵀ A``), or a pair
        ``("dual", A)`` / ``("primal", ΔW)`` with the dense ``ΔW`` (d_in x d_out).
        ``editor.stats`` must still hold the statistics of before the turn (they are recorded
        for rollback); the editor commits the new statistics after this returns.
        """
        record = _TurnRecord(turn=int(editor.turns),
                             stats={k: v.clone() for k, v in editor.stats.items()})
        try:
            with torch.no_grad():
                for name in names:
                    upd = updates[name]
                    method, u = upd if isinstance(upd, tuple) else ("dual", upd)
                    # Snapshot before the module changes (an OOM here changes nothing more).
                    record.saved[name] = self._snapshot(name)
                    self._apply_module(name, keys[name], method, u)
        except BaseException:
            self._restore(record)
            raise
        if self.history:
            self._records.append(record)

    # -- a turn made of several applications (e.g. several capture/solve/apply steps):
    #    rec = begin_turn(editor); apply_step(...) ...; commit_turn(rec)  (abort_turn(rec) on error)
    def begin_turn(self, editor) -> _TurnRecord:
        """Snapshot statistics and every module now: the turn's single rollback entry."""
        return _TurnRecord(turn=int(editor.turns),
                           stats={k: v.clone() for k, v in editor.stats.items()},
                           saved={n: self._snapshot(n) for n in self.modules})

    def apply_step(self, editor, names: Iterable[str], keys: Dict[str, torch.Tensor],
                   updates: Dict[str, Any]) -> None:
        """Like :meth:`apply_turn` (all modules or none) but without a history entry."""
        history, self.history = self.history, 0
        try:
            self.apply_turn(editor, names, keys, updates)
        finally:
            self.history = history

    def abort_turn(self, record: _TurnRecord) -> None:
        """Restore every module to the record of :meth:`begin_turn` (statistics are the caller's)."""
        self._restore(record)

    def commit_turn(self, record: _TurnRecord) -> None:
        """Keep the record of :meth:`begin_turn` as the turn's rollback entry."""
        if self.history:
            self._records.append(record)

    def _snapshot(self, name: str) -> Optional[torch.Tensor]:
        if self.accumulate:
            d = self.delta[name]
            return None if d is None else d.clone()
        return self._copy(self.modules[name].weight)

    def _apply_module(self, name: str, k: torch.Tensor, method: str, u: torch.Tensor) -> None:
        from ultraedit_kernels import apply_shift_

        if method not in ("dual", "primal"):
            raise ValueError(f"module {name!r}: unknown update kind {method!r}")
        weight = self.modules[name].weight
        linear = self.layouts[name] == "linear"
        if not self.accumulate:
            dev = weight.device
            if method == "dual":
                apply_shift_(weight, k.to(dev), u.to(dev), layout=self.layouts[name])
            else:  # u = ΔW (d_in x d_out); Linear stores W as d_out x d_in
                weight.data.add_((u.T if linear else u).to(device=dev, dtype=weight.dtype))
            return
        if not bool(torch.isfinite(u).all()):
            raise FloatingPointError(f"module {name!r}: the parameter shift is not finite")
        dev = self._dev(name)
        c = _acc_dtype(weight.dtype)
        d = self.delta[name]
        if d is None:
            d = torch.zeros(weight.shape, dtype=c, device=dev)
        # ``d`` is updated in place: the turn's snapshot holds a clone of it
        u = u.to(device=dev, dtype=c)
        if method == "primal":
            d.add_(u.T if linear else u)
        else:
            k = k.to(device=dev, dtype=c)
            if linear:
                d.addmm_(u.T, k)        # (d_out x d_in) += Aᵀ K
            else:
                d.addmm_(k.T, u)        # (d_in x d_out) += Kᵀ A
        self.delta[name] = d
        reconstruct(self.base[name], d, weight.dtype, out=weight.data)

    def _write_from(self, name: str, saved: Optional[torch.Tensor]) -> None:
        weight = self.modules[name].weight
        if self.accumulate:
            self.delta[name] = None if saved is None else saved.clone()
            if saved is None:
                weight.data.copy_(self.base[name])
            else:
                reconstruct(self.base[name], saved, weight.dtype, out=weight.data)
        else:
            weight.data.copy_(saved)

    def _restore(self, record: _TurnRecord) -> None:
        with torch.no_grad():
            for name, saved in record.saved.items():
                self._write_from(name, saved)

    # ------------------------------------------------------------------ rollback
    def rollback(self, editor, turns: int = 1) -> None:
        """Restore weights, statistics and turn count of before the last ``turns`` turns."""
        if int(turns) != turns or turns < 1:
            raise ValueError(f"turns must be a positive integer, got {turns!r}")
        if turns > len(self._records):
            raise RollbackError(
                f"cannot roll back {turns} turn(s): the history holds {len(self._records)} "
                f"(history={self.history}; pass UltraEditor(..., history=n) to keep more)")
        for _ in range(int(turns)):
            record = self._records.pop()
            self._restore(record)
            editor.stats.clear()
            editor.stats.update({k: v.clone() for k, v in record.stats.items()})
            editor.turns = record.turn

    def clear_history(self) -> None:
        self._records.clear()

    # ------------------------------------------------------------------ deltas
    def current_delta(self, name: str) -> torch.Tensor:
        """``Δ`` of a module in weight layout such that ``reconstruct(base, Δ, W.dtype) == W``.

        Accumulating: the float32 accumulator itself. Otherwise ``W - W0`` computed in float64,
        stored as float32 when that reconstructs ``W`` exactly (checked), else as float64.
        """
        weight = self.modules[name].weight.detach()
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
        raise RuntimeError(f"module {name!r}: W - W0 does not reconstruct W exactly "
                           f"(non-finite weights?)")

    def set_state(self, base: Dict[str, torch.Tensor], delta: Dict[str, Optional[torch.Tensor]],
                  base_turn: int) -> None:
        """Replace base and Δ (used when a saved state is loaded); clears the history."""
        for name in self.modules:
            self.base[name] = base[name].detach().to(self._dev(name), copy=True)
            d = delta.get(name)
            self.delta[name] = None if (d is None or not self.accumulate) else \
                d.to(device=self._dev(name), dtype=_acc_dtype(base[name].dtype))
        self.base_turn = int(base_turn)
        self._records.clear()


# ---------------------------------------------------------------------- export / apply
DELTA_FILE = "delta.safetensors"


def export_delta(editor, path) -> str:
    """Write ``ΔW`` of every edited module (weight layout) to the directory ``path``.

    Files: ``delta.safetensors`` (``<module>`` -> ΔW) and ``manifest.json`` (architecture, module
    shapes and dtypes, sha256 of the base weights each ΔW belongs to, of the edited weights and of
    the file, versions). Written atomically. Returns the path.
    """
    from . import state as _state

    tracker = editor._delta
    tensors = {name: tracker.current_delta(name).contiguous().cpu() for name in tracker.modules}
    modules = []
    for name, module in tracker.modules.items():
        w = module.weight
        modules.append({"name": name, "layout": tracker.layouts[name], "shape": list(w.shape),
                        "dtype": _state.dtype_name(w.dtype),
                        "delta_dtype": _state.dtype_name(tensors[name].dtype),
                        "base_sha256": _state.tensor_sha256(tracker.base[name]),
                        "weight_sha256": _state.tensor_sha256(w)})
    manifest = {"kind": "delta", "model": _state.model_info(editor.model),
                "turns": int(editor.turns), "base_turn": int(tracker.base_turn),
                "accumulate": tracker.accumulate, "modules": modules}
    _state.write_dir(path, {DELTA_FILE: tensors}, manifest)
    return str(path)


def apply_delta(model, path, check_base: bool = True, check_architecture: bool = True):
    """Add an exported ``ΔW`` (:func:`export_delta`) to ``model`` in place and return it.

    ``model`` must be a fresh copy of the base model the edits started from: with ``check_base``
    each module's weight is compared with the sha256 recorded at export (a mismatch raises
    ValueError before anything changes). The result equals the editor's weights bit for bit.
    """
    from . import state as _state

    manifest, files = _state.read_dir(path, expect_kind="delta")
    if check_architecture:
        _state.check_model(model, manifest["model"])
    named = dict(model.named_modules())
    tensors = files[DELTA_FILE]
    plan: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for entry in manifest["modules"]:
        name = entry["name"]
        module = named.get(name)
        if module is None or getattr(module, "weight", None) is None:
            raise ValueError(f"{path}: module {name!r} is not in this {type(model).__name__}")
        w = module.weight
        if list(w.shape) != entry["shape"]:
            raise ValueError(f"{path}: module {name!r} has weight shape {list(w.shape)}, the delta "
                             f"was exported for {entry['shape']}")
        if _state.dtype_name(w.dtype) != entry["dtype"]:
            raise ValueError(f"{path}: module {name!r} is {_state.dtype_name(w.dtype)}, the delta "
                             f"was exported for {entry['dtype']} weights (load the base model in "
                             f"that dtype)")
        if check_base and _state.tensor_sha256(w) != entry["base_sha256"]:
            raise ValueError(f"{path}: module {name!r} is not the base weight the delta was "
                             f"exported against (sha256 differs): apply it to a fresh copy of the "
                             f"base model, or pass check_base=False")
        d = tensors.get(name)
        if d is None or list(d.shape) != entry["shape"]:
            raise ValueError(f"{path}: the delta of {name!r} is missing or has the wrong shape")
        plan.append((w, d))
    with torch.no_grad():
        for w, d in plan:
            d = d.to(w.device)
            reconstruct(w.detach(), d, w.dtype, out=w.data)
    return model

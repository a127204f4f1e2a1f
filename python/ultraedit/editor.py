"""UltraEditor: lifelong UltraEdit turns on a Hugging Face causal LM (DESIGN.md §1, §2).

One turn (``UltraEditor.edit(requests)``), for requests ``(prompt, target)``:

1. Tokenize (``ultraedit.tokenization.encode_edit_batch``): answer positions are the positions
   whose label (the next token) is a target token.
2. Per micro-batch of ``micro_batch`` requests: forward, loss = mean cross-entropy over that
   micro-batch's answer tokens (the paper's loss), backward. Hooks (``ultraedit.hooks``) capture
   for every edited module ``m`` (d_in -> d_out) the inputs ``K_m`` (n x d_in) and the gradients
   of the loss w.r.t. the outputs ``G_m`` (n x d_out) at the answer positions only; no weight
   gradients are computed.
3. Normalizer: one ``RunningStats`` of ``z = [k ; g]`` per weight shape (the paper;
   ``normalizer="module"`` keeps one per module), updated with the turn's rows of every module
   of that shape BEFORE any pseudo-values are formed.
4. For each module: ``A_m = shift_factors(K_m, G_m, stats, lr, ridge)`` (N x d_out, the dual
   factor with ``ΔW_m = K_mᵀ A_m``) when N <= d_in; otherwise the dense primal
   ``ΔW_m = param_shift(..., method="primal")`` (the d_in x d_in system is then smaller), i.e.
   ``ΔW = argmin ||K ΔW - V||² + λ||ΔW||²`` with ``V = -lr ||k̂||² ĝ``.
5. All updates are checked finite, THEN applied in place (``apply_shift_``: Linear
   ``W += A_mᵀ K_m``, Conv1D ``W += K_mᵀ A_m``; primal: ``W += ΔWᵀ`` / ``W += ΔW``) on each
   module's own device, and only then are
   the new statistics committed. A turn that fails leaves weights and statistics untouched.

``compat="official"`` reproduces the reference code's computation for a turn: requests sorted by
tokenized length (longest first) before forming micro-batches, statistics updated per
micro-batch and module with its variance formula (``RunningStats(compat="official")``). Its
chunked normalization acts row by row, so it equals the normal path; its other quirks (disk
round trip, ``.grad`` accumulation, floor division of the last micro-batch) are not reproduced
because they either change nothing numerically or corrupt rows.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .delta import DeltaTracker, check_captured
from .hooks import CaptureSession
from .modules import is_embedded_smollm2, module_dims, module_layout, resolve_modules
from .tokenization import encode_edit_batch, encode_request

__all__ = ["UltraEditor", "EditRequest", "TurnReport", "EMBEDDED_LR", "PAPER_LR",
           "default_lr"]

PAPER_LR = 1e-6
# Measured default for the embedded SmolLM2-135M (docs/editor.md).
EMBEDDED_LR = 2.5e-4


def default_lr(model) -> float:
    """The measured lr for the embedded model, the paper's 1e-6 for every other model."""
    return EMBEDDED_LR if is_embedded_smollm2(model) else PAPER_LR


@dataclass(frozen=True)
class EditRequest:
    """One edit: the model should continue ``prompt`` with ``target`` (a leading space is added)."""

    prompt: str
    target: str

    @classmethod
    def coerce(cls, value: Any) -> "EditRequest":
        """Accept an EditRequest, a ``{"prompt", "target"}`` dict, a ``(prompt, target)`` pair or
        an object with ``as_request()`` (e.g. ``ultraedit.data.EditRecord``)."""
        if isinstance(value, EditRequest):
            return value
        if hasattr(value, "as_request") and callable(value.as_request):
            return cls.coerce(value.as_request())
        if isinstance(value, dict):
            missing = {"prompt", "target"} - set(value)
            if missing:
                raise ValueError(f"edit request dict is missing {sorted(missing)}: {value!r}")
            return cls(value["prompt"], value["target"])
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(value[0], value[1])
        if hasattr(value, "prompt") and hasattr(value, "target"):
            return cls(value.prompt, value.target)
        raise TypeError(f"cannot make an edit request from {type(value).__name__}: {value!r}")


@dataclass
class TurnReport:
    """What one turn did and cost.

    ``fwd_bwd_s``: time of the model's forward + loss + backward (all micro-batches);
    ``editor_s = turn_s - fwd_bwd_s``: everything else the editor does (tokenization, hooks'
    row gathering outside the timed region, statistics, solves, in-place updates);
    ``peak_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` during the turn summed over the
    devices used (``peak_source="cuda"``); on CPU an estimate (``peak_source="estimate"``):
    parameter and buffer bytes + the largest micro-batch's autograd-saved activations and
    logits + the captured rows and solver workspace of the turn.
    """

    turn: int
    n_edits: int
    n_tokens: int
    n_modules: int
    fwd_bwd_s: float
    editor_s: float
    turn_s: float
    peak_bytes: int
    peak_source: str
    capture_bytes: int
    loss: float
    modules: List[str] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class UltraEditor:
    """Lifelong UltraEdit on a Hugging Face causal LM; see the module docstring for one turn.

    Args:
        model, tokenizer: a causal LM (any device placement, e.g. ``device_map``) and its tokenizer.
        modules: None for the architecture's defaults (``ultraedit.modules``), or names/patterns.
        lr: pseudo-value step; None = the measured default for the embedded model, else the
            paper's 1e-6.
        ridge: λ of the ridge least squares (the paper: 1).
        micro_batch: requests per forward+backward (the paper: 10).
        compat: "fixed" (default, the reference code's bugs fixed) or "official".
        normalizer: "shape" (one statistics object per weight shape, the paper) or "module".
        accumulate: keep the accumulated Δ of each edited module in fp32 and write
            ``W = round(W0 + Δ)`` once per turn; "auto" = on for bf16/fp16 weights (docs/state.md).
        delta_device: where the base copy, Δ and history live (None = each module's device).
        history: how many turns ``rollback`` can undo (each costs a copy of the edited weights).
    """

    def __init__(self, model, tokenizer, modules=None, lr: Optional[float] = None,
                 ridge: float = 1.0, micro_batch: int = 10, compat: str = "fixed",
                 normalizer: str = "shape", accumulate="auto", delta_device=None,
                 history: int = 1):
        from ultraedit_kernels import RunningStats  # noqa: F401  (fail early if missing)

        if compat not in ("fixed", "official"):
            raise ValueError(f"compat must be 'fixed' or 'official', got {compat!r}")
        if normalizer not in ("shape", "module"):
            raise ValueError(f"normalizer must be 'shape' or 'module', got {normalizer!r}")
        if int(micro_batch) != micro_batch or micro_batch < 1:
            raise ValueError(f"micro_batch must be a positive integer, got {micro_batch!r}")
        self.lr = float(default_lr(model) if lr is None else lr)
        if not (self.lr > 0 and self.lr != float("inf")):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if not (float(ridge) > 0 and float(ridge) != float("inf")):
            raise ValueError(f"ridge must be a positive finite number, got {ridge!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.ridge = float(ridge)
        self.micro_batch = int(micro_batch)
        self.compat = compat
        self.normalizer = normalizer
        # Resolving validates names and module types before anything is touched.
        self.modules: Dict[str, torch.nn.Module] = dict(resolve_modules(model, modules))
        self._layout = {n: module_layout(m) for n, m in self.modules.items()}
        self._dims = {n: module_dims(m) for n, m in self.modules.items()}
        self.stats: Dict[str, Any] = {}  # stats key -> RunningStats, committed turns only
        self.turns = 0
        self._delta = DeltaTracker(self.modules, self._layout, accumulate=accumulate,
                                   device=delta_device, history=history)
        self._max_length = self._context_length(model)
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _context_length(model) -> Optional[int]:
        cfg = getattr(model, "config", None)
        for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def stats_key(self, name: str) -> str:
        """The statistics a module uses: ``"shape:<d_in>x<d_out>"`` or ``"module:<name>"``."""
        if self.normalizer == "module":
            return f"module:{name}"
        d_in, d_out = self._dims[name]
        return f"shape:{d_in}x{d_out}"

    def _input_device(self) -> torch.device:
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if emb is not None and getattr(emb, "weight", None) is not None:
            return emb.weight.device
        return next(self.model.parameters()).device

    def _order(self, requests: List[EditRequest]) -> List[EditRequest]:
        if self.compat != "official":
            return requests
        # The reference sorts by tokenized length, longest first (stable for ties).
        lengths = [sum(len(x) for x in encode_request(self.tokenizer, r.prompt, r.target)) - 1
                   for r in requests]
        order = sorted(range(len(requests)), key=lambda i: -lengths[i])
        return [requests[i] for i in order]

    def _forward_loss(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "use_cache": False}
        cols = None
        if self._keep_arg:
            # Only the columns holding answer positions need logits (the vocab projection is a
            # large part of a small model's forward).
            cols = (labels != -100).any(0).nonzero().squeeze(1)
            kwargs["logits_to_keep"] = cols
        logits = self.model(**kwargs).logits
        if cols is not None and logits.shape[1] == cols.numel():
            labels = labels.index_select(1, cols)
        labels = labels.to(logits.device)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    # ------------------------------------------------------------------ the turn
    def edit(self, requests: Iterable[Any]) -> TurnReport:
        """Apply one turn of edits in place and return its :class:`TurnReport`."""
        from ultraedit_kernels import (RunningStats, apply_shift_, choose_method, param_shift,
                                       shift_factors)

        t_start = time.perf_counter()
        reqs = [EditRequest.coerce(r) for r in requests]
        if not reqs:
            raise ValueError("edit() needs at least one request")
        reqs = self._order(reqs)
        device = self._input_device()
        batches = [encode_edit_batch(self.tokenizer, [r.prompt for r in reqs[i:i + self.micro_batch]],
                                     [r.target for r in reqs[i:i + self.micro_batch]],
                                     device=device, max_length=self._max_length)
                   for i in range(0, len(reqs), self.micro_batch)]

        cuda_devices = sorted({p.device.index or 0 for p in self.model.parameters()
                               if p.device.type == "cuda"})
        for d in cuda_devices:
            torch.cuda.reset_peak_memory_stats(d)

        param_ptrs = () if cuda_devices else {p.untyped_storage().data_ptr()
                                                for p in self.model.parameters()}
        names = list(self.modules)
        captured: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
        fwd_bwd = 0.0
        n_tokens = 0
        loss_sum = 0.0
        saved_peak = 0
        with CaptureSession(self.model, self.modules) as cap:
            for batch in batches:
                n_tokens += cap.set_mask(batch["labels"] != -100)
                saved = _SavedBytes(param_ptrs) if not cuda_devices else None
                t0 = time.perf_counter()
                with torch.enable_grad():
                    if saved is not None:
                        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                            loss = self._forward_loss(batch)
                    else:
                        loss = self._forward_loss(batch)
                    loss.backward()
                fwd_bwd += time.perf_counter() - t0
                if saved is not None:
                    saved_peak = max(saved_peak, saved.total)
                loss_sum += float(loss.detach())
                for name, kg in cap.pop().items():
                    captured[name].append(kg)
                del loss

        for name in names:  # NaN/Inf features or gradients: refuse the turn, naming the module
            for k, g in captured[name]:
                check_captured(name, k, g)

        # ---- statistics (on clones: committed only when every solve succeeded)
        new_stats: Dict[str, Any] = {}

        def stats_for(name: str, dev: torch.device):
            key = self.stats_key(name)
            if key not in new_stats:
                old = self.stats.get(key)
                d_in, d_out = self._dims[name]
                new_stats[key] = (old.clone() if old is not None
                                  else RunningStats(d_in + d_out, compat=self.compat, device=dev))
            return new_stats[key]

        def update(st, k, g):
            # = st.update(torch.cat([k, g], 1)) without building the concatenation
            st.update_pair(k.to(st.device), g.to(st.device))

        if self.compat == "official":
            # The reference updates per micro-batch, module by module, in that order.
            for b in range(len(batches)):
                for name in names:
                    k, g = captured[name][b]
                    update(stats_for(name, k.device), k, g)
        keys: Dict[str, torch.Tensor] = {}
        grads: Dict[str, torch.Tensor] = {}
        for name in names:
            parts = captured[name]
            keys[name] = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
            grads[name] = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
            if self.compat != "official":
                update(stats_for(name, keys[name].device), keys[name], grads[name])
        del captured

        # ---- solves: every module's update before any weight changes. Dual (factored, rank-N
        # in-place update) when N <= d_in, as DESIGN.md §2; a dense primal ΔW otherwise, where
        # the d_in x d_in system is the smaller and better conditioned one.
        updates: Dict[str, Tuple[str, torch.Tensor]] = {}
        for name in names:
            k, g = keys[name], grads[name]
            st = new_stats[self.stats_key(name)]
            if st.device != k.device:  # modules of one shape on several devices
                st = st.clone().to(k.device)
            if choose_method(k.shape[0], k.shape[1]) == "dual":
                upd = ("dual", shift_factors(k, g, st, lr=self.lr, ridge=self.ridge))
            else:
                upd = ("primal", param_shift(k, g, st, lr=self.lr, ridge=self.ridge,
                                             method="primal"))
            if not bool(torch.isfinite(upd[1]).all()):
                raise FloatingPointError(f"module {name!r}: the parameter shift is not finite; "
                                         f"nothing was changed")
            updates[name] = upd
        capture_bytes = sum(t.numel() * t.element_size() for d in (keys, grads)
                            for t in d.values())
        capture_bytes += sum(u.numel() * u.element_size() for _, u in updates.values())

        # ---- apply in place, then commit the statistics
        # all modules or none (ultraedit.delta: fp32 accumulation, rollback history)
        self._delta.apply_turn(self, names, keys, updates)
        self.stats.update(new_stats)
        self.turns += 1
        turn_s = time.perf_counter() - t_start

        if cuda_devices:
            peak = sum(torch.cuda.max_memory_allocated(d) for d in cuda_devices)
            source = "cuda"
        else:
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
            weights += sum(b.numel() * b.element_size() for b in self.model.buffers())
            # the N x N (dual) or d_in x d_in (primal) Gram / Cholesky factor
            workspace = max(4 * min(keys[n].shape) ** 2 for n in names)
            peak = weights + saved_peak + capture_bytes + workspace
            source = "estimate"
        return TurnReport(turn=self.turns, n_edits=len(reqs), n_tokens=n_tokens,
                          n_modules=len(names), fwd_bwd_s=fwd_bwd, editor_s=turn_s - fwd_bwd,
                          turn_s=turn_s, peak_bytes=int(peak), peak_source=source,
                          capture_bytes=int(capture_bytes), loss=loss_sum / len(batches),
                          modules=names)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Normalizer state and settings (tensors and plain values)."""
        return {"turns": self.turns, "lr": self.lr, "ridge": self.ridge, "compat": self.compat,
                "normalizer": self.normalizer, "modules": list(self.modules),
                "stats": {k: v.state_dict() for k, v in self.stats.items()}}

    def save_state(self, path, include_delta: bool = True) -> str:
        """Save statistics, configuration, turn count (and deltas) to ``path`` (docs/state.md)."""
        from .state import save_state
        return save_state(self, path, include_delta=include_delta)

    @classmethod
    def load_state(cls, path, model, tokenizer, **kwargs) -> "UltraEditor":
        """An editor on ``model`` resumed from ``save_state`` (see ``ultraedit.state.load_state``)."""
        from .state import load_state
        return load_state(cls, path, model, tokenizer, **kwargs)

    def rollback(self, turns: int = 1) -> None:
        """Restore weights, statistics and turn count of before the last ``turns`` turns exactly."""
        self._delta.rollback(self, turns)

    def export_delta(self, path) -> str:
        """Write the accumulated ΔW per module (safetensors + manifest); see ``ultraedit.apply_delta``."""
        from .delta import export_delta
        return export_delta(self, path)


class _SavedBytes:
    """Counts the bytes autograd saves for backward (CPU memory estimate), each storage once."""

    def __init__(self, exclude=()):
        self.total = 0
        self._seen = set(exclude)  # parameter storages are counted with the weights already

    def pack(self, t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self._seen:
                self._seen.add(key)
                self.total += storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse)
            pass
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

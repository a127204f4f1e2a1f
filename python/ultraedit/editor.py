"""UltraEditor: lifelong UltraEdit turns on a Hugging Face causal LM.

One turn (``UltraEditor.edit(requests)``), for requests ``(prompt, target)``:

1. **Tokenize** (``ultraedit.turn.encode_turn``): answer positions are those whose label (the
   next token) is a target token; micro-batches of ``micro_batch`` requests (or ``"auto"``),
   run by length when that pads fewer tokens (``ultraedit.turn.bucket_order``; the loss
   weights keep the given order's groups, the captured rows are put back in its order).
2. **Capture**: per micro-batch a forward and the mean cross-entropy over its answer tokens (the
   paper's loss; ``"auto"``: ``ultraedit.batching``), a backward per ``backward_group`` of
   micro-batches (the same gradients: ``ultraedit.batching``), packed into one sequence
   (``ultraedit.packing``: on the CPU, and on CUDA for groups of several micro-batches;
   ``matmul_dtype``: bfloat16 products, ``ultraedit.low_precision``).
   Hooks take, for every edited module ``m`` (d_in -> d_out), its inputs ``K_m`` (n x d_in) and
   the loss's gradients w.r.t. its outputs ``G_m`` (n x d_out) at the answer positions (or the
   subject's last token, ``positions="subject"``); no weight gradient is computed.
3. **Statistics**: one ``RunningStats`` of ``z = [k ; g]`` per weight shape (the paper;
   ``normalizer="module"``: per module), updated with the turn's rows BEFORE solving.
4. **Solve** (``ultraedit.solver``): per module ``ΔW = (K'ᵀK' + P)⁻¹K'ᵀV'`` with
   ``V = -lr ||k̂||² ĝ``, as a dual factor (rank-N update) or a dense primal ΔW; ``whiten > 0``
   whitens ``ĝ`` with the gradients' running covariance (``ultraedit.whitening``).
5. **Apply** in place (``ultraedit.state.TurnJournal``), then **commit**: the key memory takes
   the turn's keys and the turn count grows. The turn is a transaction: if anything fails,
   weights and state are restored bit for bit.

``steps > 1`` repeats 2-5 on the updated model within the same transaction; ``hold_done``
zeroes the pseudo-values of requests the model already predicts and ends the turn when all do
(``recheck``: held requests are not run again until a re-check step, ``ultraedit.held``).
``compat="official"`` reproduces the reference code: requests sorted by tokenized length
(longest first) and statistics updated per micro-batch and module with its variance formula.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from ultraedit_kernels._profiling import nvtx_range

from .batching import MicroBatchSizer, group_parts, joined, request_order
from .config import PAPER_MICRO_BATCH, EditConfig, resolve_config
from .fact_keys import fact_keys
from .held import HeldRows
from .hooks import CaptureSession, check_editable
from .low_precision import product_weights
from .modules import module_dims, module_layout, resolve_modules
from .packing import capture_group, turn_layout
from .placement import weight_slots
from .solver import Prior, Update, check_updates, first_non_finite, module_prior, solve
from .state import EditorState, KeyMemory, TurnJournal
from .whitening import add_gradients, step_whiteners
from .turn import (EditRequest, TurnMeter, TurnReport, capture_mask, check_requests,
                   context_length, input_device, nbytes, prepare_turn)

__all__ = ["UltraEditor", "EditRequest", "TurnReport", "EditConfig"]


def _option(name: str) -> property:
    return property(lambda self: getattr(self.config, name),
                    doc=f"``config.{name}`` (see :class:`~ultraedit.config.EditConfig`).")


class UltraEditor:
    """Lifelong UltraEdit on a Hugging Face causal LM; see the module docstring for one turn.

    Args:
        model, tokenizer: a causal LM (any device placement, e.g. ``device_map``) and its tokenizer.
        config: an :class:`EditConfig` (or a dict / preset name); None = the measured preset for
            this model (``EditConfig.for_model``), the paper's settings for every other model.
        **overrides: EditConfig fields, e.g. ``lr=1e-6, compat="official"``; None = not given.
            With ``compat="official"`` and no config, the options beyond the paper are off.

    Attributes: ``config``, ``modules`` ({name: module}), ``state`` (``EditorState``: statistics,
    key memories, preserved keys, turns), ``journal`` (``TurnJournal``: base weights, fp32 Δ,
    rollback history); every config field reads as an attribute (``editor.lr``).
    """

    def __init__(self, model, tokenizer, config: Optional[EditConfig] = None, **overrides):
        from ultraedit_kernels import RunningStats  # noqa: F401  (fail early if missing)

        cfg = self.config = resolve_config(model, config, overrides)
        self.model, self.tokenizer = model, tokenizer
        # Resolving validates names and module types before anything is touched.
        modules = None if cfg.modules is None else list(cfg.modules)
        self.modules: Dict[str, torch.nn.Module] = dict(resolve_modules(model, modules,
                                                                        cfg.positions))
        # where each weight's values live (offloaded: the hook's map); PlacementError if nowhere
        slots = weight_slots(model, self.modules)
        check_editable(model, self.modules, input_device(model))
        self._layout = {n: module_layout(m) for n, m in self.modules.items()}
        self._dims = {n: module_dims(m) for n, m in self.modules.items()}
        self.state = EditorState()
        self.journal = TurnJournal(self.modules, self._layout, accumulate=cfg.accumulate,
                                   device=cfg.delta_device, history=cfg.history, slots=slots)
        self._max_length = context_length(model)
        self.sizer = MicroBatchSizer(self) if cfg.micro_batch == "auto" else None
        self.preserve_s, self.preserve_cached = 0.0, False
        if cfg.preserve > 0:  # keys of the preserved subjects, from the model as it is now
            from .preserve import capture_preserved

            self.state.preserved, self.preserve_s, self.preserve_cached = capture_preserved(self, cfg)

    # ------------------------------------------------------------------ state views
    stats = property(lambda self: self.state.stats, doc="``state.stats``: the normalizers.")
    preserved = property(lambda self: self.state.preserved, doc="``state.preserved``.")
    turns = property(lambda self: self.state.turns, lambda self, value: setattr(
        self.state, "turns", int(value)), doc="Committed turns (``state.turns``).")

    def stats_key(self, name: str) -> str:
        """The statistics a module uses: ``"shape:<d_in>x<d_out>"`` or ``"module:<name>"``."""
        if self.config.normalizer == "module":
            return f"module:{name}"
        return "shape:{}x{}".format(*self._dims[name])

    # ------------------------------------------------------------------ the turn
    def check_requests(self, requests: Iterable[Any]) -> None:
        """The ValueError :meth:`edit` would raise, nothing run (:func:`.turn.check_requests`)."""
        check_requests(self.tokenizer, requests, self.config, self._max_length)

    def edit(self, requests: Iterable[Any]) -> TurnReport:
        """Apply one turn of edits in place and return its :class:`TurnReport`."""
        cfg = self.config
        meter = TurnMeter(self.model)
        reqs, batches = prepare_turn(self.tokenizer, requests, cfg, input_device(self.model),
                                     self._max_length, self.sizer)
        # this turn's subjects: their preserved keys are left out (they are meant to change)
        subjects = frozenset(r.subject for r in reqs if r.subject)
        priors: Dict[str, Optional[Prior]] = {}
        steps_run = n_predicted = capture_bytes = 0
        keys = applied = {}   # {name: K} of the last step / of the last step that applied
        group, pack = turn_layout(self, reqs, batches)
        held = HeldRows(len(reqs), cfg.recheck_every)  # recheck (ultraedit.held); 0: off
        products = product_weights(cfg.matmul_dtype, self.modules.values())  # per turn, or None
        with self.journal.transaction(self.state):
            for step in range(cfg.steps):
                run = held.batches(batches, step)
                parts, n_predicted, hold, first = self._capture(run, group, meter, step == 0, pack,
                                                                products)
                parts, n_predicted, hold = held.merge(parts, n_predicted, hold)
                if step == 0:  # the report's loss and tokens: before this turn's first update
                    loss, n_tokens = first
                if cfg.hold_done and n_predicted == len(reqs):
                    break  # every edit holds: the turn ends early, this step changes nothing
                keys, grads = self._rows(parts)
                if cfg.key_contexts and cfg.positions == "subject":  # ultraedit.fact_keys
                    keys = fact_keys(self, reqs, keys, cfg.key_contexts)
                self._update_stats(*held.fresh_rows(parts, keys, grads))
                updates = self._solve(keys, grads, hold, priors, subjects)
                capture_bytes = max(capture_bytes, nbytes(keys, grads, updates))
                with nvtx_range("ultraedit/apply"):
                    self.journal.apply(updates)
                steps_run, applied = steps_run + 1, keys
            if cfg.memory > 0:
                for name, k in applied.items():
                    self.state.memory.setdefault(name, KeyMemory(k.shape[1], k.device)).add(k)
            self.state.turns += 1
        peak, source = meter.peak(capture_bytes, keys)
        groups = -(-len(reqs) // (PAPER_MICRO_BATCH if self.sizer else cfg.micro_batch))  # loss
        turn_s = meter.elapsed()
        return TurnReport(turn=self.turns, n_edits=len(reqs), n_tokens=n_tokens,
                          n_modules=len(self.modules), fwd_bwd_s=meter.fwd_bwd,
                          editor_s=turn_s - meter.fwd_bwd, turn_s=turn_s, peak_bytes=int(peak),
                          peak_source=source, capture_bytes=int(capture_bytes),
                          loss=loss / groups, modules=list(self.modules), steps_run=steps_run,
                          n_predicted=n_predicted, micro_batch=batches[0]["labels"].shape[0],
                          backward_group=min(group, len(batches)), packed=pack)

    def _capture(self, batches, size: int, meter: TurnMeter, first: bool, pack: bool, products):
        """One step's forwards and backwards, ``size`` micro-batches per backward (``pack``:
        ``ultraedit.packing.capture_group``; ``products``: ``ultraedit.low_precision``): ``(parts,
        n_predicted, hold, (loss, tokens))``; ``parts[name]``: the micro-batches' ``(K, G)``;
        ``hold``: the rows of predicted requests (N bool, ``hold_done``; None when none is); on
        the first step the summed micro-batch losses and the answer tokens."""
        parts: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in self.modules}
        predictions, held, owners, loss_sum, n_tokens = [], [], [], 0.0, 0
        masks = [capture_mask(batch, self.config.positions) for batch in batches]
        with nvtx_range("ultraedit/capture"), CaptureSession(self.model, self.modules,
                                                             products=products) as cap:
            for start in range(0, len(batches), size):
                group = batches[start:start + size]
                results, frames = meter.run(lambda: capture_group(
                    self.model, group, masks[start:start + size], cap,
                    self.config.hold_margin, pack))
                for batch, mask, (loss, predicted), kg in zip(group, masks[start:], results, frames):
                    if first:
                        n_tokens += int((batch["labels"] != -100).sum())
                        loss_sum += float(loss)
                    for name, pair in kg.items():  # official: statistics per group of 10
                        parts[name] += group_parts(pair, batch, mask)
                    predictions.append(predicted)
                    if self.config.hold_done:
                        predicted = predicted.to(mask.device)
                        held.append(predicted[:, None].expand(mask.shape)[mask])
                    if "request_index" in batch:  # forwards by length: rows back in turn order
                        owners.append(batch["request_index"][:, None].expand(mask.shape)[mask])
        n_predicted = int(sum(p.sum() for p in predictions))  # one sync per step
        hold = torch.cat(held) if self.config.hold_done and n_predicted else None
        if owners:
            parts, perm = request_order(parts, owners)
            hold = None if hold is None else hold.index_select(0, perm.to(hold.device))
        return parts, n_predicted, hold, (loss_sum, n_tokens)

    def _rows(self, parts):
        """Each module's ``K`` and ``G``; refused if one holds NaN/Inf (one check per tensor)."""
        pairs = {n: joined(p) for n, p in parts.items()}
        keys, grads = {n: k for n, (k, _) in pairs.items()}, {n: g for n, (_, g) in pairs.items()}
        bad = first_non_finite({**{(n, "inputs (keys)"): k for n, k in keys.items()},
                                **{(n, "output gradients"): g for n, g in grads.items()}})
        if bad is not None:
            name, what = bad
            t = (keys if what.startswith("inputs") else grads)[name]
            raise FloatingPointError(
                f"module {name!r}: the captured {what} contain {int((~torch.isfinite(t)).sum())} "
                f"NaN/Inf value(s) (a NaN/Inf loss or activation in the forward/backward); the "
                f"turn was refused and nothing was changed")
        return keys, grads

    def _stats_for(self, name: str, device):
        from ultraedit_kernels import RunningStats

        key = self.stats_key(name)
        if key not in self.state.stats:
            d_in, d_out = self._dims[name]
            self.state.stats[key] = RunningStats(d_in + d_out, compat=self.config.compat,
                                                 device=device)
        return self.state.stats[key]

    def _update_stats(self, parts, keys, grads) -> None:
        """Merge the step's rows into the statistics (official: per micro-batch and module)."""
        with nvtx_range("ultraedit/stats"):
            if self.config.compat == "official":
                blocks = [(n, kg) for b in range(len(next(iter(parts.values()))))
                          for n, kg in ((n, parts[n][b]) for n in parts)]
            else:
                blocks = [(n, (keys[n], grads[n])) for n in keys]
            for name, (k, g) in blocks:
                st = self._stats_for(name, k.device)
                st.update_pair(k.to(st.device), g.to(st.device), check_finite_values=False)
            if self.config.whiten > 0:  # the gradients' running covariance (ultraedit.whitening)
                add_gradients(self.state.whitening, grads, self.stats_key)

    def _solve(self, keys, grads, hold, priors, subjects) -> Dict[str, Update]:
        """Every module's update before any weight changes; refused if one is not finite."""
        cfg, out = self.config, {}
        with nvtx_range("ultraedit/solve"):
            whiteners = (step_whiteners(self.state.whitening, keys, self.stats_key, cfg.whiten)
                         if cfg.whiten > 0 else {})
            for name, k in keys.items():
                out[name] = self._solve_module(name, k, grads[name], hold, priors, subjects,
                                               whiteners.get(name))
        check_updates(out, cfg.lr, cfg.ridge, official=cfg.compat == "official")
        return out

    def _solve_module(self, name, k, g, hold, priors, subjects, whitener=None) -> Update:
        """One module's update (``ultraedit.solver.solve``) with its prior (:meth:`_prior`);
        ``whitener``: the statistics key's ``ultraedit.whitening.Whitener`` (``whiten > 0``)."""
        cfg, st = self.config, self.state.stats[self.stats_key(name)]
        if st.device != k.device:  # modules of one shape on several devices
            st = st.clone().to(k.device)
        return solve(k, g, st, lr=cfg.lr, ridge=cfg.ridge, hold=hold, whitener=whitener,
                     protect_mean=cfg.protect_mean, prior=self._prior(name, priors, subjects))

    def _prior(self, name, priors, subjects) -> Optional[Prior]:
        """The module's prior (``ultraedit.solver.module_prior``), built once per turn."""
        if name not in priors:
            priors[name] = module_prior(self.state, name, self.config, subjects)
        return priors[name]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The configuration, the edited modules and ``state.state_dict()``."""
        return {"config": self.config.to_dict(), "modules": list(self.modules),
                **self.state.state_dict()}

    def save_state(self, path, include_delta: bool = True, meta=None) -> str:
        """Save configuration, state (and deltas) to ``path`` (``ultraedit.checkpoint``)."""
        from .checkpoint import save_state
        return save_state(self, path, include_delta=include_delta, meta=meta)

    @classmethod
    def load_state(cls, path, model, tokenizer, **kwargs) -> "UltraEditor":
        """An editor on ``model`` resumed from ``save_state`` (``ultraedit.checkpoint.load_state``)."""
        from .checkpoint import load_state
        return load_state(cls, path, model, tokenizer, **kwargs)

    def rollback(self, turns: int = 1) -> None:
        """Restore weights and state of before the last ``turns`` turns exactly."""
        self.journal.rollback(self.state, turns)

    def export_delta(self, path, format: str = "delta", rank: Optional[int] = None,
                     max_shard_size="5GB") -> str:
        """Write the edit: ``"delta"`` (ΔW per module, ``apply_delta``), ``"peft"`` (a LoRA
        adapter; ``rank`` truncates) or ``"merged"`` (``ultraedit.checkpoint.export_delta``)."""
        from .checkpoint import export_delta
        return export_delta(self, path, format=format, rank=rank, max_shard_size=max_shard_size)


for _name in EditConfig.field_names():
    if _name != "modules":  # ``editor.modules`` is the resolved {name: module}
        setattr(UltraEditor, _name, _option(_name))

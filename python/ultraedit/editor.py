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

Options beyond the paper (docs/editor.md; off for every model but the embedded one):
``steps`` (capture + solve + apply repeated on the updated model), ``hold_done`` (rows of
requests the model already predicts get pseudo-value 0, and the turn ends when all hold),
``positions="subject"`` (capture at the last subject token instead of the answer positions),
``memory=ν`` (``(KᵀK + νM + λI)ΔW = KᵀV`` with ``M`` the keys of earlier turns,
``ultraedit.memory``), ``preserve=μ`` (``+ μ K_pᵀK_p`` with ``K_p`` the keys of preserved
subject names, captured once, without the turn's own subjects; ``ultraedit.preserve``) and
``protect_mean`` (a mean-key row with target 0).

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
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .delta import DeltaTracker, check_captured
from ultraedit_kernels._profiling import nvtx_range

from .config import EditConfig, resolve_config
from .hooks import CaptureSession
from .modules import module_dims, module_layout, resolve_modules
from .tokenization import encode_edit_batch, encode_request

__all__ = ["UltraEditor", "EditRequest", "TurnReport", "EditConfig"]

@dataclass(frozen=True)
class EditRequest:
    """One edit: the model should continue ``prompt`` with ``target`` (a leading space is added).

    ``subject``: the entity the fact is about, a substring of ``prompt`` (``"France"`` in
    ``"The capital of France is"``); needed only by ``positions="subject"``.
    """

    prompt: str
    target: str
    subject: Optional[str] = None

    @classmethod
    def coerce(cls, value: Any) -> "EditRequest":
        """Accept an EditRequest, a ``{"prompt", "target"}`` dict, a ``(prompt, target)`` pair or
        an object with ``as_request()`` (e.g. ``ultraedit.data.EditRecord``); dicts and
        tuples may carry a ``subject`` (``{"subject": ...}``, ``(prompt, target, subject)``)."""
        if isinstance(value, EditRequest):
            return value
        if hasattr(value, "as_request") and callable(value.as_request):
            return cls.coerce(value.as_request())
        if isinstance(value, dict):
            missing = {"prompt", "target"} - set(value)
            if missing:
                raise ValueError(f"edit request dict is missing {sorted(missing)}: {value!r}")
            return cls(value["prompt"], value["target"], value.get("subject"))
        if isinstance(value, (tuple, list)) and len(value) in (2, 3):
            return cls(*value)
        if hasattr(value, "prompt") and hasattr(value, "target"):
            return cls(value.prompt, value.target, getattr(value, "subject", None))
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
    steps_run: int = 1
    n_predicted: int = 0

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
        protect_mean: α ≥ 0 of the mean-key protection (docs/editor.md): each module's least
            squares gets one more row ``sqrt(α·N)·μ_k`` with target 0 (``μ_k`` = the running mean
            of the keys, ``stats.mean[:d_in]``, this turn included), so ``ΔWᵀμ_k ≈ 0`` and
            prompts near the mean key (same template, other subjects) move less. 0 = the paper.
            None = the measured default for the embedded model, else 0.
        steps: capture + solve + apply this many times per turn on the same requests (each
            step's rows are a new block of the statistics); the turn stays one transaction and
            one rollback entry. None = the measured default for the embedded model, else 1.
        hold_done: hold the edits that already hold (docs/editor.md): in every step, the rows of
            a request whose target the model already predicts (teacher-forced argmax equal to
            the target at every answer position, read from that step's own forward) get
            pseudo-value 0, so the step keeps their outputs instead of pushing them further,
            and the turn ends as soon as every request is predicted (``TurnReport.steps_run``).
            False = the paper. None = the measured default for the embedded model, else False.
        positions: where keys and output gradients are captured: ``"answer"`` (the answer
            positions, the paper: subject-free) or ``"subject"`` (the last token of each
            request's ``subject`` in its prompt; the loss is still the target's, so the gradient
            reaches the subject through attention; every request needs a subject). Also picks
            the default ``modules``. None = the measured default for the embedded model, else
            ``"answer"``; ``compat="official"`` needs ``"answer"``.
        memory: ν ≥ 0 of the key memory (``ultraedit.memory``): each module keeps ``M = Σ KᵀK``
            of the keys of its committed turns and solves ``(KᵀK + νM + λI) ΔW = KᵀV``, so a
            turn leaves the outputs on earlier edits' keys unchanged (costs a d_in x d_in float64
            matrix per module). 0 = the paper (no state besides the normalizer). None = the
            measured default for the embedded model, else 0.
        preserve: μ ≥ 0 of the preserved subjects (``ultraedit.preserve``): at construction,
            each module's inputs at the last token of every subject of ``preserve_subjects`` in
            a few neutral contexts are captured from the model as it is then, and every solve
            adds ``μ K_pᵀK_p`` (without the rows of the subjects the turn edits), so edits leave
            the outputs on other entities' keys unchanged. Costs one truncated forward over
            those texts at construction (``editor.preserve_s``). 0 = the paper. None = the
            measured default for the embedded model, else 0.
        preserve_subjects: the subject names to preserve (matched against
            ``EditRequest.subject`` by exact string); None = every country of the offline
            tables and its 1,000 most populous cities (``ultraedit.preserve.default_subjects``).
        preserve_contexts: the texts around each subject (``"{s}"`` marks it; only the text up
            to the subject matters); None = ``ultraedit.preserve.DEFAULT_CONTEXTS``.
    """

    def __init__(self, model, tokenizer, config: Optional[EditConfig] = None, **overrides):
        from ultraedit_kernels import RunningStats  # noqa: F401  (fail early if missing)

        self.config = resolve_config(model, config, overrides)
        cfg = self.config
        self.model = model
        self.tokenizer = tokenizer
        self.lr, self.ridge, self.micro_batch = cfg.lr, cfg.ridge, cfg.micro_batch
        self.compat, self.normalizer, self.positions = cfg.compat, cfg.normalizer, cfg.positions
        self.protect_mean, self.steps, self.hold_done = cfg.protect_mean, cfg.steps, cfg.hold_done
        self.memory, self.preserve = cfg.memory, cfg.preserve
        # Resolving validates names and module types before anything is touched.
        self._memory_factors: Dict[str, torch.Tensor] = {}
        self.modules: Dict[str, torch.nn.Module] = dict(
            resolve_modules(model, None if cfg.modules is None else list(cfg.modules), cfg.positions))
        self._layout = {n: module_layout(m) for n, m in self.modules.items()}
        self._dims = {n: module_dims(m) for n, m in self.modules.items()}
        self.stats: Dict[str, Any] = {}  # stats key -> RunningStats, committed turns only
        self.turns = 0
        self._delta = DeltaTracker(self.modules, self._layout, accumulate=cfg.accumulate,
                                   device=cfg.delta_device, history=cfg.history)
        self._max_length = self._context_length(model)
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        # preserve > 0: keys of the preserved subjects, captured once from the model as it is now
        self.preserved: Dict[str, Any] = {}
        self.preserve_s = 0.0
        self._turn_subjects: frozenset = frozenset()
        if self.preserve > 0:
            from .preserve import DEFAULT_CONTEXTS, capture_subject_keys, default_subjects

            t0 = time.perf_counter()
            subjects = (default_subjects() if cfg.preserve_subjects is None
                        else list(cfg.preserve_subjects))
            contexts = DEFAULT_CONTEXTS if cfg.preserve_contexts is None else cfg.preserve_contexts
            self.preserved = capture_subject_keys(model, tokenizer, self.modules, subjects,
                                                  contexts, progress=len(subjects) > 256)
            self.preserve_s = time.perf_counter() - t0

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

    def _forward_loss(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over the answer tokens, and which requests (B bool) the model
        already predicts: teacher-forced argmax equal to the target at every answer position."""
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
        with torch.no_grad():
            predicted = ((logits.argmax(-1) == labels) | (labels == -100)).all(1)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return loss, predicted

    def _constrained_update(self, name: str, k: torch.Tensor, g: torch.Tensor, st,
                            hold: Optional[torch.Tensor]):
        """Ridge LS with held rows, the mean-key row and the key memory.

        ``V = pseudo_values(K, G)`` with ``V[hold] = 0`` (rows of requests the model already
        predicts keep their output); with ``protect_mean = α > 0`` one more row
        ``K' = [K; sqrt(α·N)·μ_k]``, ``V' = [V; 0]``. Returns ``(("dual", A'), K')`` with
        ``ΔW = K'ᵀA'`` when N' <= d_in, else ``(("primal", ΔW), K)``. With a key memory
        (``memory = ν > 0`` and earlier turns), ``ΔW = (K'ᵀK' + νM + λI)⁻¹K'ᵀV'`` in float64 by
        Woodbury: ``(("dual", A), Yᵀ)`` with ``Y = (νM + λI)⁻¹K'ᵀ``, ``ΔW = Y A``.
        """
        from .memory import memory_factor, memory_key
        from ultraedit_kernels import choose_method, gram, pseudo_values
        from ultraedit_kernels.param_shift import _solve_checked

        n, d_in = k.shape
        v = pseudo_values(k, g, st, lr=self.lr)
        if hold is not None:
            v = v.masked_fill(hold.to(v.device)[:, None], 0.0)
        kp, vp = k, v
        if self.protect_mean > 0:
            mu = st.mean[:d_in].to(device=k.device, dtype=torch.float32)
            row = (math.sqrt(self.protect_mean * n) * mu).to(k.dtype)[None]
            kp = torch.cat([k, row], 0)
            vp = torch.cat([v, v.new_zeros(1, v.shape[1])], 0)
        memory = self.stats.get(memory_key(name)) if self.memory > 0 else None
        preserved = self.preserved.get(name) if self.preserve > 0 else None
        if memory is not None or preserved is not None:
            # Woodbury with P = νM + μK_pᵀK_p + λI, factored once per turn (M and the preserved
            # rows change only between turns): (KᵀK + P)⁻¹KᵀV = Y (I + KY)⁻¹ V with
            # Y = P⁻¹Kᵀ (d_in x N), applied as the rank-N update Yᵀ-factor: W += (Y A)ᵀ.
            factor = self._memory_factors.get(name)
            if factor is None:
                gram_p = (preserved.gram_without(self._turn_subjects)
                          if preserved is not None else None)
                factor = memory_factor(memory, self.memory, self.ridge, gram_p, self.preserve)
                self._memory_factors[name] = factor
            kd = kp.to(device=factor.device, dtype=torch.float64)
            y = torch.cholesky_solve(kd.T, factor)
            inner = kd @ y
            inner.diagonal().add_(1.0)
            a = _solve_checked(inner, vp.to(torch.float64), "memory update")
            return ("dual", a.float()), y.T.to(k.dtype).contiguous()
        if choose_method(kp.shape[0], d_in) == "dual":
            return ("dual", _solve_checked(gram(kp, self.ridge, True), vp,
                                           "constrained update (dual)")), kp
        dw = _solve_checked(gram(kp, self.ridge, False), kp.float().T @ vp,
                            "constrained update (primal)")
        return ("primal", dw), k

    def _capture_mask(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The (B x L bool) positions whose keys and output gradients are captured."""
        if self.positions == "subject":
            mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
            index = batch["subject_index"]
            mask[torch.arange(index.numel(), device=mask.device), index.to(mask.device)] = True
            return mask
        return batch["labels"] != -100

    def _subject_indices(self, reqs: List[EditRequest]) -> List[int]:
        """Each request's subject token index (``positions="subject"``); errors name the request."""
        from .tokenization import special_prefix, subject_token_index

        prefix = special_prefix(self.tokenizer)
        out = []
        for i, r in enumerate(reqs):
            if r.subject is None:
                raise ValueError(
                    f"edit request {i} ({r.prompt!r} -> {r.target!r}) has no subject, but this "
                    f"editor captures at subject positions (positions='subject'): pass "
                    f"EditRequest(prompt, target, subject=...) or {{'subject': ...}}, or build the "
                    f"editor with positions='answer' (the paper's subject-free method)")
            try:
                out.append(subject_token_index(self.tokenizer, r.prompt, r.subject, prefix))
            except ValueError as exc:
                raise ValueError(f"edit request {i}: {exc}") from None
        return out

    def _module_update(self, name: str, k: torch.Tensor, g: torch.Tensor, st,
                       hold: Optional[torch.Tensor] = None):
        """One module's update for this step: ``((kind, tensor), keys_to_apply_with)``.

        ``kind="dual"``: ``tensor`` is the factor A (N x d_out) with ``ΔW = KᵀA``;
        ``kind="primal"``: ``tensor`` is the dense ΔW (d_in x d_out). ``hold``: N bool, rows
        whose pseudo-value is 0 (``hold_done``; None when no row is held).
        """
        from ultraedit_kernels import choose_method, param_shift, shift_factors

        if self.protect_mean > 0 or self.memory > 0 or self.preserve > 0 or hold is not None:
            return self._constrained_update(name, k, g, st, hold)
        if choose_method(k.shape[0], k.shape[1]) == "dual":
            return ("dual", shift_factors(k, g, st, lr=self.lr, ridge=self.ridge)), k
        return ("primal", param_shift(k, g, st, lr=self.lr, ridge=self.ridge, method="primal")), k

    # ------------------------------------------------------------------ the turn
    def edit(self, requests: Iterable[Any]) -> TurnReport:
        """Apply one turn of edits in place and return its :class:`TurnReport`."""
        from ultraedit_kernels import RunningStats

        t_start = time.perf_counter()
        self._memory_factors = {}  # the key memory's factor, per module, for this turn's steps
        reqs = [EditRequest.coerce(r) for r in requests]
        if not reqs:
            raise ValueError("edit() needs at least one request")
        reqs = self._order(reqs)
        # this turn's subjects: their preserved keys are left out (they are meant to change)
        self._turn_subjects = frozenset(r.subject for r in reqs if r.subject)
        device = self._input_device()
        batches = [encode_edit_batch(self.tokenizer, [r.prompt for r in reqs[i:i + self.micro_batch]],
                                     [r.target for r in reqs[i:i + self.micro_batch]],
                                     device=device, max_length=self._max_length)
                   for i in range(0, len(reqs), self.micro_batch)]
        if self.positions == "subject":
            subject_index = self._subject_indices(reqs)
            for b, batch in enumerate(batches):
                chunk = subject_index[b * self.micro_batch:(b + 1) * self.micro_batch]
                batch["subject_index"] = torch.tensor(chunk, dtype=torch.long, device=device)

        cuda_devices = sorted({p.device.index or 0 for p in self.model.parameters()
                               if p.device.type == "cuda"})
        for d in cuda_devices:
            torch.cuda.reset_peak_memory_stats(d)

        param_ptrs = () if cuda_devices else {p.untyped_storage().data_ptr()
                                                for p in self.model.parameters()}
        names = list(self.modules)
        fwd_bwd = 0.0
        n_tokens = 0
        loss_sum = 0.0
        saved_peak = 0
        capture_bytes = 0
        # ---- statistics (on clones: committed only when every solve succeeded; with
        # steps > 1 each step's rows are a new block of the same clones)
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
            with nvtx_range("ultraedit/stats"):
                st.update_pair(k.to(st.device), g.to(st.device))

        # steps > 1: capture + solve + apply again on the updated model (same requests);
        # the turn is one transaction (and one rollback entry) over all its steps.
        turn_record = self._delta.begin_turn(self) if self.steps > 1 else None
        steps_run = 0
        n_predicted = 0
        keys: Dict[str, torch.Tensor] = {}
        applied_keys: Dict[str, torch.Tensor] = {}
        try:
            for step in range(self.steps):
                captured: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
                predictions: List[torch.Tensor] = []  # per micro-batch: B bool
                held: List[torch.Tensor] = []  # hold_done: per micro-batch, the predicted rows
                with nvtx_range("ultraedit/capture"), CaptureSession(self.model, self.modules) as cap:
                    for batch in batches:
                        mask = self._capture_mask(batch)
                        cap.set_mask(mask)
                        if step == 0:  # the turn's answer tokens, counted once
                            n_tokens += int((batch["labels"] != -100).sum())
                        saved = _SavedBytes(param_ptrs) if not cuda_devices else None
                        t0 = time.perf_counter()
                        with torch.enable_grad():
                            if saved is not None:
                                with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                                    loss, predicted = self._forward_loss(batch)
                            else:
                                loss, predicted = self._forward_loss(batch)
                            loss.backward()
                        fwd_bwd += time.perf_counter() - t0
                        if saved is not None:
                            saved_peak = max(saved_peak, saved.total)
                        if step == 0:  # the report's loss: before this turn's first update
                            loss_sum += float(loss.detach())
                        for name, kg in cap.pop().items():
                            captured[name].append(kg)
                        predictions.append(predicted)
                        if self.hold_done:
                            predicted = predicted.to(mask.device)
                            held.append(predicted[:, None].expand(mask.shape)[mask])
                        del loss
                n_predicted = int(sum(p.sum() for p in predictions))  # one sync per step

                if self.hold_done and n_predicted == len(reqs):
                    break  # every edit holds: the turn ends early, this step changes nothing

                for name in names:  # NaN/Inf features or gradients: refuse the turn, naming the module
                    for k, g in captured[name]:
                        check_captured(name, k, g)

                if self.compat == "official":
                    # The reference updates per micro-batch, module by module, in that order.
                    for b in range(len(batches)):
                        for name in names:
                            k, g = captured[name][b]
                            update(stats_for(name, k.device), k, g)
                keys = {}
                grads: Dict[str, torch.Tensor] = {}
                for name in names:
                    parts = captured[name]
                    keys[name] = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
                    grads[name] = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
                    if self.compat != "official":
                        update(stats_for(name, keys[name].device), keys[name], grads[name])
                del captured
                hold_rows = torch.cat(held) if self.hold_done and n_predicted else None

                # ---- solves: every module's update before any weight changes. Dual (factored, rank-N
                # in-place update) when N <= d_in, as DESIGN.md §2; a dense primal ΔW otherwise, where
                # the d_in x d_in system is the smaller and better conditioned one.
                updates: Dict[str, Tuple[str, torch.Tensor]] = {}
                apply_keys: Dict[str, torch.Tensor] = dict(keys)  # [K; protection row] if protect_mean
                for name in names:
                    k, g = keys[name], grads[name]
                    st = new_stats[self.stats_key(name)]
                    if st.device != k.device:  # modules of one shape on several devices
                        st = st.clone().to(k.device)
                    upd, apply_keys[name] = self._module_update(name, k, g, st, hold_rows)
                    if not bool(torch.isfinite(upd[1]).all()):
                        raise FloatingPointError(f"module {name!r}: the parameter shift is not finite; "
                                                 f"nothing was changed")
                    updates[name] = upd
                capture_bytes = max(capture_bytes, sum(t.numel() * t.element_size() for d in (keys, grads)
                                    for t in d.values())
                                    + sum(u.numel() * u.element_size() for _, u in updates.values()))

                # ---- apply in place, then commit the statistics
                # all modules or none (ultraedit.delta: fp32 accumulation, rollback history)
                with nvtx_range("ultraedit/apply"):
                    if turn_record is None:
                        self._delta.apply_turn(self, names, apply_keys, updates)
                    else:  # one step of a multi-step turn: its record restores all of it on failure
                        self._delta.apply_step(self, names, apply_keys, updates)
                steps_run += 1
                applied_keys = keys
        except BaseException:
            self._memory_factors = {}
            if turn_record is not None:
                self._delta.abort_turn(turn_record)
            raise
        self._memory_factors = {}  # derived from the memory of before this turn
        if turn_record is not None:
            self._delta.commit_turn(turn_record)
        if self.memory > 0:
            from .memory import KeyMemory, memory_key
            for name, k in applied_keys.items():
                old = self.stats.get(memory_key(name))
                mem = old.clone() if old is not None else KeyMemory(k.shape[1], device=k.device)
                new_stats[memory_key(name)] = mem.add(k)
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
            workspace = max((4 * min(keys[n].shape) ** 2 for n in keys), default=0)
            peak = weights + saved_peak + capture_bytes + workspace
            source = "estimate"
        return TurnReport(turn=self.turns, n_edits=len(reqs), n_tokens=n_tokens,
                          n_modules=len(names), fwd_bwd_s=fwd_bwd, editor_s=turn_s - fwd_bwd,
                          turn_s=turn_s, peak_bytes=int(peak), peak_source=source,
                          capture_bytes=int(capture_bytes), loss=loss_sum / len(batches),
                          modules=names, steps_run=steps_run, n_predicted=n_predicted)

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

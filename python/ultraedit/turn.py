"""What a turn takes and gives: edit requests, their encoding, and the turn's report.

:class:`EditRequest` is one edit ``(prompt, target[, subject])``; :func:`encode_turn` checks and
tokenizes a turn's requests into micro-batches (with each request's subject token index for
``positions="subject"``); :class:`TurnReport` is what the turn did and cost, measured by
:class:`TurnMeter`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .config import PAPER_MICRO_BATCH
from .tokenization import (encode_edit_batch, encode_request, shown, special_prefix,
                           subject_token_index)

__all__ = ["EditRequest", "TurnReport", "TurnMeter", "prepare_turn", "encode_turn",
           "bucket_order", "length_order"]


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
                raise ValueError(f"edit request dict is missing {sorted(missing)}: "
                                 f"{shown(repr(value))}")
            return cls(value["prompt"], value["target"], value.get("subject"))
        if isinstance(value, (tuple, list)) and len(value) in (2, 3):
            return cls(*value)
        if hasattr(value, "prompt") and hasattr(value, "target"):
            return cls(value.prompt, value.target, getattr(value, "subject", None))
        raise TypeError(f"cannot make an edit request from {type(value).__name__}: "
                        f"{shown(repr(value))}")


@dataclass
class TurnReport:
    """What one turn did and cost.

    ``fwd_bwd_s``: time of the model's forward + loss + backward (all micro-batches and steps);
    ``editor_s = turn_s - fwd_bwd_s``: everything else the editor does (tokenization, hooks'
    row gathering outside the timed region, statistics, solves, in-place updates);
    ``peak_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` during the turn summed over the
    devices used (``peak_source="cuda"``); on CPU an estimate (``peak_source="estimate"``):
    parameter and buffer bytes + the largest micro-batch's autograd-saved activations and
    logits + the captured rows and solver workspace of the turn. Either counts tensors only:
    not the allocator's cached or freed memory, the interpreter, the tokenizer or libraries, so
    a process's resident memory grows by more. ``capture_bytes``: the largest step's captured
    keys and gradients plus its solved factors. ``micro_batch``: requests per forward pass (the
    last one may hold fewer); with ``micro_batch="auto"`` the size the memory budget allowed.
    ``backward_group``: micro-batches per backward (``ultraedit.batching.backward_group_size``).
    ``packed``: each backward group's requests ran as one packed sequence (``ultraedit.packing``).
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
    micro_batch: int = 0
    backward_group: int = 1
    packed: bool = False

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def check_requests(tokenizer, requests, config, max_length) -> None:
    """Raise the ``ValueError`` :func:`prepare_turn` (and so ``UltraEditor.edit``) raises for
    ``requests`` as one turn: an empty prompt or target, a target that tokenizes to nothing, a
    subject missing from its prompt, a request longer than the model's context. Nothing runs:
    the requests are only tokenized, so a stream can check its later turns before the first."""
    with warnings.catch_warnings():   # edit() warns about these requests when it runs them
        warnings.simplefilter("ignore")
        whole_turn = (lambda tok, reqs: len(reqs)) if config.micro_batch == "auto" else None
        prepare_turn(tokenizer, requests, config, torch.device("cpu"), max_length, whole_turn)


def prepare_turn(tokenizer, requests, config, device, max_length, sizer=None):
    """``(requests, micro-batches)`` of a turn: each request coerced (:meth:`EditRequest.coerce`),
    in the reference code's order with ``compat="official"``, tokenized once
    (:func:`encode_turn`). With ``micro_batch="auto"``, ``sizer(tokenizer, requests)`` gives the
    requests per forward and each batch carries the paper's loss weights (:func:`loss_weights`).
    With ``compat="fixed"`` the forwards run in :func:`bucket_order` (by length) when that pads
    fewer tokens: each batch then carries its requests' ``request_index`` and the loss weights
    of the requests' groups in the given order, so the gradients are the given order's
    (``ultraedit.batching.request_order`` puts the captured rows back in that order). Warns
    about subjects that are not used (``positions="answer"``) and about a prompt given two
    targets in one turn."""
    if isinstance(requests, (EditRequest, dict)) or hasattr(requests, "as_request"):
        requests = [requests]   # one request given alone: a turn of one
    elif isinstance(requests, (str, bytes)):
        raise TypeError(f"edit() takes a list of requests (EditRequest, {{'prompt', 'target'}} "
                        f"dicts or (prompt, target) pairs), got the string {shown(repr(requests))}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("edit() needs gradients, which torch.inference_mode() turns off: call "
                           "it outside that block")
    reqs = [EditRequest.coerce(r) for r in requests]
    if not reqs:
        raise ValueError("edit() needs at least one request")
    prefix = special_prefix(tokenizer)
    encoded = [encode_request(tokenizer, r.prompt, r.target, prefix) for r in reqs]
    lengths = [len(p) + len(t) - 1 for p, t in encoded]
    official = config.compat == "official"
    if official:
        order = length_order(lengths)
        reqs, encoded = [reqs[i] for i in order], [encoded[i] for i in order]
        lengths = [lengths[i] for i in order]
    auto = config.micro_batch == "auto"
    if auto and sizer is None:
        raise ValueError("micro_batch='auto' needs a sizer (UltraEditor makes one)")
    size = int(sizer(tokenizer, reqs)) if auto else config.micro_batch
    run = None if official else bucket_order(lengths, size)
    index = range(len(reqs)) if run is None else run
    batches = encode_turn(tokenizer, [reqs[i] for i in index], size, config.positions, device,
                          max_length, encoded=[encoded[i] for i in index])
    if auto or run is not None:
        loss_weights(batches, PAPER_MICRO_BATCH if auto else size, index=official, order=run)
    if config.positions == "answer" and any(r.subject is not None for r in reqs):
        warnings.warn("edit requests carry subjects, but keys are captured at the answer "
                      "positions (positions='answer'): the subjects are not used", stacklevel=3)
    targets: Dict[str, set] = {}
    for r in reqs:
        targets.setdefault(r.prompt, set()).add(r.target)
    conflicts = [(prompt, ts) for prompt, ts in targets.items() if len(ts) > 1]
    if conflicts:   # one warning per turn, however many: a long stream must not flood stderr
        prompt, ts = conflicts[0]
        warnings.warn(f"prompt {shown(prompt)} has {len(ts)} targets in one turn "
                      f"({', '.join(sorted(map(shown, ts))[:3])})"
                      f"{_and_more(len(conflicts), 'prompts')}: their updates pull "
                      f"against each other", stacklevel=3)
    return reqs, batches


def _and_more(count: int, noun: str) -> str:
    """What a warning that names the first of ``count`` cases adds about the others."""
    return f" (and {count - 1} more such {noun})" if count > 1 else ""


def encode_turn(tokenizer, reqs: List[EditRequest], micro_batch: int, positions: str,
                device, max_length: Optional[int],
                encoded: Optional[List[Tuple[List[int], List[int]]]] = None
                ) -> List[Dict[str, torch.Tensor]]:
    """The turn's micro-batches (``encode_edit_batch``; ``encoded``: the requests'
    ``encode_request`` ids if already made), with ``subject_index`` (B long) when keys are
    captured at the subject's last token."""
    batches = [encode_edit_batch(tokenizer, [r.prompt for r in reqs[i:i + micro_batch]],
                                 [r.target for r in reqs[i:i + micro_batch]],
                                 device=device, max_length=max_length,
                                 encoded=None if encoded is None else encoded[i:i + micro_batch])
               for i in range(0, len(reqs), micro_batch)]
    if positions == "subject":
        index = subject_indices(tokenizer, reqs)
        for b, batch in enumerate(batches):
            chunk = index[b * micro_batch:(b + 1) * micro_batch]
            batch["subject_index"] = torch.tensor(chunk, dtype=torch.long, device=device)
    return batches


def length_order(lengths: List[int]) -> List[int]:
    """Indices by token length, longest first; ties keep their order (the reference code's
    sort of a turn's requests)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def bucket_order(lengths: List[int], size: int) -> Optional[List[int]]:
    """The order in which a turn's requests (token ``lengths``) go through forwards of ``size``:
    :func:`length_order` when its forwards pad fewer tokens than the given order's, else None
    (the given order). Each forward is padded to its longest request, so its cost grows with
    ``size x`` that length; sorted chunks minimize the sum of those."""
    if size >= len(lengths):
        return None

    def padded(order):
        return sum(len(order[i:i + size]) * max(lengths[j] for j in order[i:i + size])
                   for i in range(0, len(order), size))

    order = length_order(lengths)
    return order if padded(order) < padded(range(len(lengths))) else None


def loss_weights(batches: List[Dict[str, torch.Tensor]], group: int, index: bool = False,
                 order: Optional[List[int]] = None) -> None:
    """Give every batch ``loss_weight`` (B, float64): ``w_r = 1 / T_b`` for each request ``r``
    of the turn's group ``b`` of ``group`` consecutive requests, ``T_b`` the group's answer
    tokens, so that a forward's loss ``Σ_r w_r Σ_{t∈r} CE_t = Σ_b (1/T_b) Σ_{t∈b} CE_t`` has
    the gradients of the paper's per-micro-batch mean losses (requests are independent rows
    of a batch). ``index``: also ``group_index`` (B long), each request's group counted from 0
    per batch (to split the captured rows by group, ``ultraedit.batching.group_parts``).
    ``order``: the batches hold the requests ``order[0], order[1], ...`` of the turn (not its
    given order): groups are the given order's, and each batch gets ``request_index`` (B long,
    the requests' places in the given order)."""
    counts = torch.cat([(b["labels"] != -100).sum(1).cpu() for b in batches])
    place = torch.arange(counts.numel()) if order is None else torch.tensor(order)
    owner = place // group
    totals = torch.zeros(int(owner.max()) + 1, dtype=torch.float64).index_add_(
        0, owner, counts.to(torch.float64))
    weights, start = 1.0 / totals[owner], 0
    for b in batches:
        n, device = b["labels"].shape[0], b["labels"].device
        b["loss_weight"] = weights[start:start + n].to(device)
        if index:
            b["group_index"] = (owner[start:start + n] - owner[start]).to(device)
        if order is not None:
            b["request_index"] = place[start:start + n].to(device)
        start += n


def input_device(model) -> torch.device:
    """Where the model's input ids go: its input embedding's device."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        dev = emb.weight.device
    else:
        emb, dev = None, next(model.parameters()).device
    if dev.type == "meta":  # offloaded (accelerate): where its hook runs it
        from .placement import execution_device
        dev = execution_device(emb) if emb is not None else None
        dev = dev or torch.device("cpu")
    return dev


def context_length(model) -> Optional[int]:
    """The model's maximum sequence length from its config, None if it has none."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def subject_indices(tokenizer, reqs: List[EditRequest]) -> List[int]:
    """Each request's subject token index (``positions="subject"``); errors name the request."""
    prefix = special_prefix(tokenizer)
    out, inside_words = [], []
    for i, r in enumerate(reqs):
        if r.subject is None:
            raise ValueError(
                f"edit request {i} ({shown(r.prompt)} -> {shown(r.target)}) has no subject, but this "
                f"editor captures at subject positions (positions='subject'): pass "
                f"EditRequest(prompt, target, subject=...) or {{'subject': ...}}, or build the "
                f"editor with positions='answer' (the paper's subject-free method)")
        try:
            out.append(subject_token_index(tokenizer, r.prompt, r.subject, prefix))
        except ValueError as exc:
            raise ValueError(f"edit request {i}: {exc}") from None
        start = r.prompt.rfind(r.subject)
        end = start + len(r.subject)
        if (start > 0 and r.prompt[start - 1].isalnum() and r.subject[0].isalnum()) or (
                end < len(r.prompt) and r.prompt[end].isalnum() and r.subject[-1].isalnum()):
            inside_words.append(i)
    if inside_words:   # one warning per turn, naming the first such request
        i = inside_words[0]
        warnings.warn(f"edit request {i}: the subject {shown(reqs[i].subject)} is part of a "
                      f"longer word in {shown(reqs[i].prompt)}"
                      f"{_and_more(len(inside_words), 'requests')}; keys are captured at its "
                      f"last token, which may not be the entity's", stacklevel=4)
    return out


def capture_mask(batch: Dict[str, torch.Tensor], positions: str) -> torch.Tensor:
    """The (B x L bool) positions whose keys and output gradients are captured."""
    if positions == "subject":
        mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
        index = batch["subject_index"]
        mask[torch.arange(index.numel(), device=mask.device), index.to(mask.device)] = True
        return mask
    return batch["labels"] != -100


def nbytes(keys: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor], updates) -> int:
    """Bytes of a step's captured keys and gradients and of its solved factors (``Update``)."""
    rows = sum(t.numel() * t.element_size() for d in (keys, grads) for t in d.values())
    return rows + sum(u.nbytes() for u in updates.values())


class TurnMeter:
    """Times the forward/backward passes and measures (CUDA) or estimates (CPU) peak memory."""

    def __init__(self, model):
        self.model = model
        self.start = time.perf_counter()
        self.cuda = sorted({p.device.index or 0 for p in model.parameters()
                            if p.device.type == "cuda"})
        for d in self.cuda:
            torch.cuda.reset_peak_memory_stats(d)
        self._params = () if self.cuda else {p.untyped_storage().data_ptr()
                                             for p in model.parameters()}
        self.fwd_bwd = 0.0
        self.saved_peak = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, fn):
        """``fn()`` timed as forward/backward, counting (CPU) the bytes autograd saves."""
        t0 = time.perf_counter()
        if self.cuda:
            out = fn()
        else:
            saved = _SavedBytes(self._params)
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                out = fn()
            self.saved_peak = max(self.saved_peak, saved.total)
        self.fwd_bwd += time.perf_counter() - t0
        return out

    def peak(self, capture_bytes: int, keys: Dict[str, torch.Tensor]):
        """``(peak_bytes, peak_source)`` (see :class:`TurnReport`)."""
        if self.cuda:
            return sum(torch.cuda.max_memory_allocated(d) for d in self.cuda), "cuda"
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        weights += sum(b.numel() * b.element_size() for b in self.model.buffers())
        # the N x N (dual) or d_in x d_in (primal) Gram / Cholesky factor
        workspace = max((4 * min(k.shape) ** 2 for k in keys.values()), default=0)
        return weights + self.saved_peak + capture_bytes + workspace, "estimate"


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

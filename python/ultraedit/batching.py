"""Turns sized for the memory: ``micro_batch="auto"``, and the loss that keeps the paper's
gradients.

The paper forwards 10 requests at a time and back-propagates the mean cross-entropy over each
micro-batch's answer tokens. With ``micro_batch="auto"`` one forward holds ``F`` requests and its
loss is

    L = Σ_b (1/T_b) Σ_{t∈b} CE_t

over the paper's groups ``b`` of 10 consecutive requests of the turn (``T_b``: the group's
answer tokens; weights from ``ultraedit.turn.loss_weights``, loss and backward in
:func:`weighted_forward_backward`). The requests of a batch are independent sequences (right
padding, causal attention, no weight gradient), so the gradient of ``L`` with respect to a
module's output at an answer position of group ``b`` is ``(1/T_b) ∂CE_t/∂out``: exactly what
the 10-request path captures, for any ``F``, also when a group spans several forwards. The
reported loss is ``Σ_b mean_b / n_groups``, the 10-request path's too.

``F`` is the largest of the whole turn, the multiples of 10 below it and (``compat="fixed"``
only) 5, 2 and 1 whose predicted peak (:func:`ultraedit.plan.plan_turn` on the actual requests'
shapes, :func:`ultraedit.plan.request_shape`) fits the budget: ``memory_budget_gib``, by default
the model's weights plus 85% of the free memory (CUDA: ``torch.cuda.mem_get_info`` plus the
allocator's cached free blocks of the devices the model uses; CPU: the available RAM of
``/proc/meminfo``, else 8 GiB). A group never straddles two forwards, so ``compat="official"``
(whose smallest ``F`` is 10) still merges its statistics group by group, in its length-sorted
order (:func:`group_parts`). The budget counts the delta record and rollback history as if they were still to be
allocated: conservative by their size after the first turn.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .config import PAPER_MICRO_BATCH

__all__ = ["MicroBatchSizer", "memory_budget", "forward_backward", "weighted_forward_backward",
           "grouped_forward_backward", "backward_by_batch", "float_rows", "backward_group_size",
           "device_type", "answer_logits", "group_parts", "joined", "request_order",
           "FREE_SHARE", "CPU_FALLBACK_BYTES"]

GiB = 1 << 30
FREE_SHARE = 0.85              # of the free memory a turn may use by default
CPU_FALLBACK_BYTES = 8 * GiB   # available RAM where the system does not say


def forward_backward(model, batch: Dict[str, torch.Tensor], margin: float = 0.0):
    """Forward ``batch``, back-propagate its loss and return ``(loss detached, predicted)``: which
    requests (B bool) the model already predicts (teacher-forced argmax equal to the target at
    every answer position; with ``margin > 0``, the target's logit ahead of every other token's
    by at least ``margin``: :func:`_predicted`). The paper's loss, the mean cross-entropy over
    the micro-batch's ``n`` answer tokens, ``L = (1/n) Σ_t CE_t`` (``F.cross_entropy`` of the
    ``(n, V)`` answer rows), or with ``batch["loss_weight"]`` (``micro_batch="auto"``) the
    weighted ``L = Σ_r w_r Σ_{t∈r} CE_t`` (:func:`weighted_forward_backward`). Only the answer
    rows are projected to the vocabulary (:func:`answer_logits`)."""
    mask = batch["labels"] != -100
    with torch.enable_grad():
        loss, predicted = _answer_loss(answer_logits(model, batch, mask), batch, mask, margin)
        loss.backward()
    return loss.detach(), predicted


def _answer_loss(rows: torch.Tensor, batch: Dict[str, torch.Tensor], mask: torch.Tensor,
                 margin: float = 0.0):
    """``(L, predicted)`` of a batch from the logits of its answer rows (n x V, row-major in
    ``mask``): ``L = Σ_r w_r Σ_{t∈r} CE_t`` with ``batch["loss_weight"]``, else the paper's
    mean (:func:`_column_mean`); ``predicted`` as :func:`_predicted`."""
    target = batch["labels"][mask].to(rows.device)
    return _loss_of_ce(F.cross_entropy(rows, target, reduction="none"), batch, mask), \
        _predicted(rows, target, mask, margin)


def _loss_of_ce(ce: torch.Tensor, batch: Dict[str, torch.Tensor], mask: torch.Tensor):
    """A batch's loss from the cross-entropies ``ce`` (n) of its answer rows (row-major in
    ``mask``): ``Σ_r w_r Σ_{t∈r} CE_t`` with ``batch["loss_weight"]``, else the paper's mean
    (:func:`_column_mean`)."""
    if "loss_weight" in batch:
        owner = mask.nonzero()[:, 0].to(ce.device)          # the request of each answer row
        return (ce * batch["loss_weight"].to(ce)[owner]).sum()
    return _column_mean(ce, mask)


def float_rows(rows: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: float32, float64 kept."""
    return rows if rows.dtype == torch.float64 else rows.float()


def _column_mean(ce: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(1/n) Σ_t CE_t`` of the answer rows' ``ce`` (n), summed in the order and grouping of
    ``F.cross_entropy(logits[:, cols].flatten(0, 1), labels[:, cols].flatten(),
    ignore_index=-100)`` over the union ``cols`` of the batch's answer columns: the loss (and
    its last bit) of an editor that projected those ``B x |cols|`` rows to the vocabulary. Why:
    the mean's summation tree depends on the positions of the ignored rows, and the recorded
    turns' losses are compared bit for bit. The ``(B |cols|, 1)`` input of ``F.nll_loss``
    holds ``-CE_t`` at the answer positions (target 0) and is ignored elsewhere; its gradient
    with respect to ``CE_t`` is ``1/n``, as that of the plain mean."""
    sub = mask[:, mask.any(0)].reshape(-1).to(ce.device)
    flat = ce.new_zeros(sub.numel(), 1).index_put((sub.nonzero().squeeze(1),), -ce[:, None])
    target = torch.where(sub, 0, -100)
    return F.nll_loss(flat, target, ignore_index=-100)


def answer_logits(model, batch: Dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The logits of the answer rows, ``(n, V)`` float32 (float64 kept), rows in row-major order
    of ``mask`` (B x L bool): ``model(...).logits[mask]``, but the vocabulary projection
    (``model.get_output_embeddings()``) sees only those rows: a forward pre-hook gathers them,
    ``(B, L, h) -> (1, n, h)``, so ``n`` logit rows are computed instead of ``B x L`` (a 49k
    vocabulary on a 135M model is a quarter of a forward) or ``B`` times the union of the
    requests' answer columns. No ``logits_to_keep`` is passed (``0`` = all positions). The
    model gets the batch's ``input_ids`` and its ``attention_mask`` or ``position_ids``
    (``ultraedit.packing``: one packed row)."""
    index = mask.reshape(-1).nonzero().squeeze(1)
    gathered: List[bool] = []

    def gather(module, args):
        x = args[0]
        if tuple(x.shape[:2]) != tuple(mask.shape):
            return None
        gathered.append(True)
        rows = x.reshape(-1, x.shape[-1]).index_select(0, index.to(x.device))
        return (rows.unsqueeze(0),) + tuple(args[1:])

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    handle = head.register_forward_pre_hook(gather) if head is not None else None
    try:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")
                  if k in batch}
        logits = model(**inputs, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    # squeeze, not [0]: a select's backward copies into zeros of the whole (1, n, V) input
    return float_rows(logits.squeeze(0) if gathered else logits[mask.to(logits.device)])


def _predicted(rows: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               margin: float = 0.0) -> torch.Tensor:
    """Which requests (B bool) predict every answer token: the argmax of its row is the target
    (``margin`` 0), or the target's logit exceeds every other token's by at least ``margin``."""
    with torch.no_grad():
        owner = mask.nonzero()[:, 0].to(rows.device)       # the request of each answer row
        if margin > 0:   # runner-up: the best logit, the second best where that is the target
            at_target = rows.gather(1, target[:, None])[:, 0]
            best, index = rows.topk(2, dim=-1)
            runner_up = torch.where(index[:, 0] == target, best[:, 1], best[:, 0])
            short = at_target - runner_up < margin
        else:
            short = rows.argmax(-1) != target
        wrong = torch.zeros(mask.shape[0], device=rows.device).index_add_(0, owner, short.float())
    return wrong == 0


def weighted_forward_backward(model, batch: Dict[str, torch.Tensor], margin: float = 0.0):
    """Forward ``batch``, back-propagate ``L = Σ_r w_r Σ_{t∈r} CE_t`` over its answer
    positions (``w = batch["loss_weight"]``, ``ultraedit.turn.loss_weights``) and return
    ``(L detached, predicted)``: which requests (B bool) the model already predicts
    (teacher-forced argmax equal to the target at every answer position). Only the answer
    rows are projected to the vocabulary (:func:`answer_logits`)."""
    if "loss_weight" not in batch:
        raise ValueError("weighted_forward_backward needs batch['loss_weight'] "
                         "(ultraedit.turn.loss_weights)")
    return forward_backward(model, batch, margin)


def grouped_forward_backward(model, batches: List[Dict[str, torch.Tensor]], begin=None,
                             margin: float = 0.0):
    """Forward every batch of ``batches`` and back-propagate ``Σ_b L_b`` once, with one vocabulary
    projection for all of them; returns ``[(L_b detached, predicted_b)]`` as
    :func:`forward_backward` would for each batch alone.

    ``L_b`` is the batch's own loss (the paper's micro-batch mean, or the weighted loss of
    ``loss_weight``), and the batches are separate graphs, so ``∂(Σ L)/∂h`` at any activation
    ``h`` of batch ``b`` is ``∂L_b/∂h``: the captured gradients of :func:`forward_backward` run
    batch by batch. What changes is the vocabulary projection: the answer rows of every batch
    (``n_b x h``; a forward pre-hook on ``model.get_output_embeddings()`` keeps them and passes
    on an empty input) are projected at the last batch's forward as one ``(Σ n_b) x h`` product,
    and its backward is one product too. On a CPU the 49152 x 576 projection of a 135M model
    runs at twice the FLOP rate for 170 rows as for 17 (measured,
    ``experiments/turn_speed.md``), and each of its rows is the same to the bit (the GEMM's rows
    are independent on one thread).

    ``margin``: as in :func:`forward_backward`. ``begin(i, batch)`` is called before batch
    ``i``'s forward (the capture's ``CaptureSession.set_mask``). The batches' activations stay
    alive until the backward: the memory of one forward of all their requests, less padding.

    One batch is :func:`forward_backward` itself. A model that does not call its output
    embedding on the ``(B, L, h)`` hidden states (or has none) runs its batches one by one with
    :func:`forward_backward`, the same result, and a warning."""
    if len(batches) == 1:
        if begin is not None:
            begin(0, batches[0])
        return [forward_backward(model, batches[0], margin)]
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return _one_by_one(model, batches, begin, 0, margin)
    masks = [b["labels"] != -100 for b in batches]
    pending: List[torch.Tensor] = []
    current = {"index": None, "mask": None, "fired": False, "last": False}

    def gather(module, args):
        x, mask = args[0], current["mask"]
        if tuple(x.shape[:2]) != tuple(mask.shape):
            return None
        current["fired"] = True
        rows = x.reshape(-1, x.shape[-1]).index_select(0, current["index"].to(x.device))
        pending.append(rows)
        if not current["last"]:
            return (rows[:0].unsqueeze(0),) + tuple(args[1:])   # projected at the last batch
        return (torch.cat(pending).unsqueeze(0),) + tuple(args[1:])

    with torch.enable_grad():
        handle = head.register_forward_pre_hook(gather)
        try:
            for i, (batch, mask) in enumerate(zip(batches, masks)):
                if begin is not None:
                    begin(i, batch)
                current.update(index=mask.reshape(-1).nonzero().squeeze(1), mask=mask,
                               fired=False, last=i == len(batches) - 1)
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False).logits
                if not current["fired"]:
                    if i > 0:
                        raise RuntimeError(f"{type(model).__name__} called its output embedding "
                                           f"on the hidden states of one forward and not of "
                                           f"another; use backward_group=1")
                    handle.remove()   # its logits are whole: this batch alone, then the rest
                    loss, predicted = _answer_loss(float_rows(out[mask.to(out.device)]), batch,
                                                   mask, margin)
                    loss.backward()
                    return [(loss.detach(), predicted)] + _one_by_one(model, batches, begin, 1,
                                                                      margin)
            logits = out.reshape(-1, out.shape[-1])    # a view: no zero-filled gradient
        finally:
            handle.remove()
        return backward_by_batch(float_rows(logits), batches, masks, margin)


def backward_by_batch(rows: torch.Tensor, batches: List[Dict[str, torch.Tensor]],
                      masks: List[torch.Tensor], margin: float = 0.0):
    """Back-propagate ``Σ_b L_b`` once and return ``[(L_b detached, predicted_b)]``: each
    batch's loss and predictions (:func:`_answer_loss`) from the answer rows of all ``batches``
    (``rows``: ``(Σ n_b) x V``, batch after batch, each in row-major order of its answer
    ``mask``)."""
    # one cross-entropy over all rows, split per batch as n numbers: a split of the (n x V)
    # rows would concatenate their gradients in its backward, one more pass over all of them
    # (each row's cross-entropy is computed alone, so its bits do not depend on the others)
    targets = [b["labels"][mask].to(rows.device) for b, mask in zip(batches, masks)]
    sizes = [t.numel() for t in targets]
    ce = F.cross_entropy(rows, torch.cat(targets), reduction="none")
    losses = [_loss_of_ce(part, batch, mask)
              for batch, mask, part in zip(batches, masks, ce.split(sizes))]
    predicted = [_predicted(part, target, mask, margin) for part, target, mask
                 in zip(rows.detach().split(sizes), targets, masks)]
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss.to(total.device)
    total.backward()
    return [(loss.detach(), p) for loss, p in zip(losses, predicted)]


def _one_by_one(model, batches, begin, start: int, margin: float = 0.0):
    """:func:`forward_backward` of ``batches[start:]``, one by one (a model whose output
    embedding the shared projection cannot use); warns once per process and call site."""
    warnings.warn(f"{type(model).__name__} does not call its output embedding "
                  f"(get_output_embeddings()) on the hidden states of a forward, so its "
                  f"micro-batches cannot share one vocabulary projection: one backward per "
                  f"micro-batch (backward_group=1)", stacklevel=3)
    out = []
    for i in range(start, len(batches)):
        if begin is not None:
            begin(i, batches[i])
        out.append(forward_backward(model, batches[i], margin))
    return out


def device_type(model) -> Optional[str]:
    """The one device type that holds every parameter of ``model`` (``"cpu"``, ``"cuda"``, ...),
    ``None`` when they are spread over several types (an offloaded model)."""
    kinds = {p.device.type for p in model.parameters()}
    return kinds.pop() if len(kinds) == 1 else None


def backward_group_size(editor, reqs, batches: List[Dict[str, torch.Tensor]],
                        devices: Tuple[str, ...] = ("cpu",)) -> int:
    """The micro-batches per backward of a turn (:func:`grouped_forward_backward`):
    ``config.backward_group`` when it is a number; with ``"auto"``, on a model whose parameters
    are all on one device type of ``devices``, the largest of the turn's forwards, half of them,
    a quarter, ... whose activations are predicted to fit the memory budget
    (:func:`ultraedit.plan.plan_turn` with that ``backward_group``; it pads every forward to the
    longest request; planned once per shape of turn and budget), else 1. The CPU is always
    among them: its gain is the shared vocabulary projection (one of 17 rows runs at half the
    FLOP rate of one of 170, ``experiments/turn_speed.md``); on an H200 a padded group measured
    0.95-1.14x, so CUDA joins only for a turn that packs (:func:`ultraedit.packing.turn_layout`)."""
    group = editor.config.backward_group
    if group != "auto":
        return group
    if len(batches) < 2 or device_type(editor.model) not in devices:
        return 1
    from .plan import request_shape

    # each request's (prompt, target) tokens from its batch: P + T - 1 positions, T labels
    answers = torch.cat([(b["labels"] != -100).sum(1) for b in batches]).tolist()
    spans = torch.cat([b["attention_mask"].sum(1) for b in batches]).tolist()
    lengths = [(n - t + 1, t) for n, t in zip(spans, answers)]
    per_forward = batches[0]["labels"].shape[0]
    try:
        budget = memory_budget(editor.model, editor.config)
        shape = request_shape(None, reqs, per_forward, lengths)
        # the plan depends on the turn only through its shape: turns alike are planned once
        key = (len(batches), per_forward, *sorted(shape.items()), budget >> 26)
        cache = editor.__dict__.setdefault("_backward_group_plans", {})
        if key not in cache:
            sizer = editor.sizer or MicroBatchSizer(editor)
            cache[key], group = 1, len(batches)
            while group > 1:
                if sizer.plan(reqs, lengths, per_forward, budget, backward_group=group).fits:
                    cache[key] = group
                    break
                group = (group + 1) // 2 if group > 2 else 1
        return cache[key]
    except Exception:  # noqa: BLE001 (an architecture the plan does not know: the paper's loop)
        return 1


def group_parts(kg: Tuple[torch.Tensor, torch.Tensor], batch: Dict[str, torch.Tensor],
                mask: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """A forward's captured ``(K, G)`` split into its groups' rows (views), in order; one part
    when the batch carries no groups (``group_index``)."""
    if "group_index" not in batch:
        return [kg]
    index = batch["group_index"].cpu()
    rows = torch.zeros(int(index[-1]) + 1, dtype=torch.long).index_add_(
        0, index, mask.sum(1).cpu()).tolist()
    return list(zip(kg[0].split(rows), kg[1].split(rows)))


def joined(pairs: List[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """One module's ``(K, G)`` of a step from its list of per-forward ``(K, G)`` pairs (rows
    concatenated in order; a single pair as it is)."""
    if len(pairs) == 1:
        return pairs[0]
    return torch.cat([k for k, _ in pairs]), torch.cat([g for _, g in pairs])


def request_order(parts: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]],
                  owners: List[torch.Tensor]):
    """The rows of forwards that ran in another order than the turn's requests
    (``ultraedit.turn.bucket_order``) put back in the turn's order: ``(parts, perm)`` with
    ``parts[name] = [(K, G)]``, rows sorted by request (``owners``: each forward's captured rows'
    ``request_index``, in capture order; a stable sort keeps each request's rows in position
    order), and ``perm`` the index that did it (for other per-row tensors)."""
    # sorted where the masks live (no host round trip on a GPU)
    perm = torch.argsort(torch.cat([o.to(owners[0].device) for o in owners]), stable=True)
    out = {}
    for name, p in parts.items():
        k, g = joined(p)
        index = perm.to(k.device)
        out[name] = [(k.index_select(0, index), g.index_select(0, index))]
    return out, perm


def available_ram() -> int:
    """The available RAM in bytes (``MemAvailable`` of ``/proc/meminfo``), else 8 GiB."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return CPU_FALLBACK_BYTES


def memory_budget(model, config) -> int:
    """Bytes a turn may use: ``memory_budget_gib``, else the model's parameters and buffers
    plus ``FREE_SHARE`` of the free memory (CUDA devices the model uses, else the RAM)."""
    if config.memory_budget_gib is not None:
        return int(config.memory_budget_gib * GiB)
    tensors = list(model.parameters()) + list(model.buffers())
    weights = sum(t.numel() * t.element_size() for t in tensors)
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    if cuda:
        free = sum(torch.cuda.mem_get_info(d)[0] + torch.cuda.memory_reserved(d)
                   - torch.cuda.memory_allocated(d) for d in cuda)
    else:
        free = available_ram()
    return int(weights + FREE_SHARE * free)


class MicroBatchSizer:
    """``sizer(tokenizer, requests) -> F``: the requests per forward of ``micro_batch="auto"``
    for an editor (see the module docstring); ``last_plan`` is the chosen size's
    :class:`ultraedit.plan.TurnPlan` (None when the model could not be planned)."""

    def __init__(self, editor):
        self.editor = editor
        self.last_plan = None
        self._warned = False

    def candidates(self, n: int) -> List[int]:
        """The sizes tried, largest first: ``n``, the multiples of 10 below it, then 5, 2, 1
        (``compat="fixed"``) or 10 (``compat="official"``)."""
        g = PAPER_MICRO_BATCH
        small = [g] if self.editor.config.compat == "official" else [5, 2, 1]
        return sorted({n} | set(range(g, n, g)) | {s for s in small if s <= n}, reverse=True)

    def plan(self, reqs, lengths, size: int, budget: int, backward_group: int = 1):
        """The :class:`ultraedit.plan.TurnPlan` of the turn ``reqs`` (token ``lengths`` from
        :func:`ultraedit.plan.request_lengths`) in forwards of ``size`` requests, with this
        editor's model, modules and settings; its logits are counted at the answer rows
        only (:func:`weighted_forward_backward`); ``backward_group`` forwards per backward."""
        from .plan import plan_turn, request_shape

        ed, cfg = self.editor, self.editor.config
        shape = request_shape(None, reqs, size, lengths)
        pres = max((p.keys.shape[0] for p in ed.state.preserved.values()), default=0)
        return plan_turn(ed.model, next(iter(ed.modules.values())).weight.dtype,
                         list(ed.modules), edits=len(reqs), micro_batch=size,
                         budget_bytes=budget, **shape, positions=cfg.positions,
                         accumulate=cfg.accumulate, history=cfg.history, memory=cfg.memory,
                         preserve=cfg.preserve, preserved_rows=pres, steps=cfg.steps,
                         whiten=cfg.whiten, delta_device=cfg.delta_device,
                         matmul_dtype=cfg.matmul_dtype,
                         backward_group=backward_group,
                         attn_implementation=getattr(ed.model.config, "_attn_implementation",
                                                     None))

    def __call__(self, tokenizer, reqs) -> int:
        from .plan import request_lengths

        sizes = self.candidates(len(reqs))
        lengths = request_lengths(tokenizer, reqs)
        budget = memory_budget(self.editor.model, self.editor.config)
        plans: Dict[int, object] = {}
        try:
            def plan(size):
                if size not in plans:
                    plans[size] = self.plan(reqs, lengths, size, budget)
                return plans[size]

            # the whole turn first (one forward keeps no rows of earlier ones), then a binary
            # search over the others (their peak grows with the size)
            lo, hi = 1, len(sizes) - 1
            if plan(sizes[0]).fits:
                lo = hi = 0
            while lo < hi:
                mid = (lo + hi) // 2
                if plan(sizes[mid]).fits:
                    hi = mid
                else:
                    lo = mid + 1
            self.last_plan = plan(sizes[hi])
        except Exception as exc:  # noqa: BLE001 (an architecture the plan does not know)
            self._warn(f"micro_batch='auto' cannot predict this model's memory ({exc}); "
                       f"using the paper's {PAPER_MICRO_BATCH} requests per forward")
            self.last_plan = None
            return min(PAPER_MICRO_BATCH, len(reqs))
        if not self.last_plan.fits:
            self._warn(f"micro_batch='auto': even {sizes[hi]} request(s) per forward are "
                       f"predicted not to fit: {self.last_plan.reason}")
        return sizes[hi]

    def _warn(self, text: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(text, stacklevel=4)

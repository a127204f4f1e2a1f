"""Packed forwards: a backward group's requests as one sequence of their tokens, no padding.

A turn's micro-batches are right padded ``B x L`` batches. Every matrix product of a decoder
layer (q/k/v/o, the MLP) works on each token alone, so the group's ``T = Σ_r L_r`` real tokens
can run as one ``(1, T)`` sequence: one product of ``T`` rows per linear layer instead of one
per micro-batch of ``~T/10`` rows, and no padded positions. On a 2-core CPU the embedded
model's backbone forward of the 100 official-settings requests runs 1.21x (one thread) to 1.38x
(two) faster that way (``experiments/packed_forward.py``), and the backward's row-restricted
input gradients (``ultraedit.backward_rows``) become one product per linear too.

Only attention mixes tokens. While a packed forward runs, the model's attention implementation
is :data:`PACKED_ATTENTION`, registered with transformers' ``AttentionInterface``: it gathers the
queries, keys and values of requests of equal length into ``(n, heads, L, d)`` blocks and calls
transformers' own ``sdpa`` attention on each block (causal, no mask), then puts the rows back.
Each request gets the positions ``0..L_r-1`` (``position_ids``), as in its padded batch. So
every request's activations are those of its padded forward up to rounding (measured: 4e-7
relative on the embedded model), and the loss, captured keys and gradients are the group's
(:func:`packed_forward_backward`).

When: ``EditConfig.pack``. ``"auto"`` packs a model whose parameters are all on the CPU, or
all on CUDA devices in a turn whose backward groups hold several micro-batches
(:func:`auto_packs`: the measured cases), whose attention is transformers' ``sdpa`` and which
passes :func:`probe` (a packed and a padded forward of two short random sequences agree; once
per model), in a turn whose requests all fit the model's sliding window if it has one; ``"on"``
packs on any device and refuses what ``"auto"`` would not pack; ``"off"`` never packs.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from .backward_rows import backward_span
from . import batching
from .batching import (answer_logits, backward_by_batch, backward_group_size,
                       grouped_forward_backward)

__all__ = ["PackedLayout", "packed_forward_backward", "capture_group", "pack_turn", "probe",
           "batches_in_forward", "sliding_window", "unpackable", "on_cpu",
           "auto_packs", "turn_layout", "PACKED_ATTENTION"]

PACKED_ATTENTION = "ultraedit_packed"
_ACTIVE: List["PackedLayout"] = []     # the layout of the packed forward running now


class PackedLayout:
    """Where each request's tokens sit in the packed ``(1, T)`` sequence of ``batches``.

    ``input_ids``, ``position_ids``: ``(1, T)``; ``lengths``: each request's tokens, in batch
    order; :meth:`pack` maps per-batch ``(B, L)`` tensors to ``(1, T)`` (the real tokens of each
    row, row after row: the row-major order of a batch's positions, so rows captured from the
    packed sequence come in the order the batches would give them). For attention the tokens are
    regrouped by request length: ``order`` (T) lists the tokens of all requests of one length
    together, ``blocks`` the ``(length, requests)`` of each such run, ``restore`` undoes
    ``order``."""

    def __init__(self, batches: List[Dict[str, torch.Tensor]]):
        self.real = [b["attention_mask"].bool() for b in batches]
        self.n_batches = len(batches)
        for r in self.real:
            n = r.sum(1, keepdim=True)
            if not torch.equal(r, torch.arange(r.shape[1], device=r.device) < n):
                raise ValueError("packed forwards need right-padded batches")
        self.input_ids = self.pack([b["input_ids"] for b in batches])
        device = self.input_ids.device
        lengths = torch.cat([r.sum(1) for r in self.real]).cpu()
        self.lengths: List[int] = lengths.tolist()
        starts = torch.cumsum(lengths, 0) - lengths
        self.position_ids = torch.cat([torch.arange(n) for n in self.lengths])[None].to(device)
        by_length = sorted(range(len(self.lengths)), key=lambda i: (-self.lengths[i], i))
        order, self.blocks = [], []
        for i in by_length:
            n = self.lengths[i]
            order.append(torch.arange(int(starts[i]), int(starts[i]) + n))
            if self.blocks and self.blocks[-1][0] == n:
                self.blocks[-1][1] += 1
            else:
                self.blocks.append([n, 1])
        order_t = torch.cat(order)
        self.order = order_t.to(device)
        self.restore = torch.empty_like(order_t).scatter_(
            0, order_t, torch.arange(order_t.numel())).to(device)
        self.tokens = int(order_t.numel())
        self.calls = 0          # attention calls so far (the probe checks that there were some)

    def pack(self, tensors: List[torch.Tensor]) -> torch.Tensor:
        """Per-batch ``(B, L, ...)`` tensors as one ``(1, T, ...)``: each row's real tokens."""
        return torch.cat([t[r.to(t.device)] for t, r in zip(tensors, self.real)])[None]


class _Reorder(torch.autograd.Function):
    """``x.index_select(dim, order)`` for a permutation ``order`` whose inverse is ``restore``;
    backward: ``grad.index_select(dim, restore)`` (a gather, where ``index_select``'s own
    backward adds the gradient into zeros)."""

    @staticmethod
    def forward(ctx, x, order, restore, dim):
        ctx.restore, ctx.dim = restore, dim
        return x.index_select(dim, order)

    @staticmethod
    def backward(ctx, grad):
        return grad.index_select(ctx.dim, ctx.restore), None, None, None


def _packed_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of the active :class:`PackedLayout`: causal within each request, none across;
    transformers' ``sdpa`` attention on each run of equal-length requests. ``query``, ``key``,
    ``value``: ``(1, heads, T, d)``; returns ``((1, T, heads, d), None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = _ACTIVE[-1]
    if query.shape[0] != 1 or query.shape[2] != layout.tokens or key.shape[2] != layout.tokens:
        raise RuntimeError(f"packed attention got queries {tuple(query.shape)} and keys "
                           f"{tuple(key.shape)} for a packed sequence of {layout.tokens} tokens")
    layout.calls += 1
    order, restore = layout.order.to(query.device), layout.restore.to(query.device)
    # squeeze, not [0]: a select's backward copies into zeros of the whole input
    q, k, v = (_Reorder.apply(t.squeeze(0), order, restore, 1) for t in (query, key, value))
    kwargs.pop("is_causal", None)
    # one split, not a slice per block: a slice's backward writes its gradient into zeros of the
    # whole sequence and autograd adds those up; a split's backward is one concatenation
    sizes = [n * length for length, n in layout.blocks]
    out = []
    for (length, n), *parts in zip(layout.blocks, *(t.split(sizes, 1) for t in (q, k, v))):
        block = [t.unflatten(1, (n, length)).transpose(0, 1) for t in parts]
        o, _ = sdpa_attention_forward(module, *block, None, is_causal=True, **kwargs)
        out.append(o.reshape(n * length, *o.shape[2:]))        # (n L, heads, d)
    return _Reorder.apply(torch.cat(out), restore, order, 0)[None], None


def batches_in_forward() -> int:
    """The micro-batches the forward running now holds: a packed forward's, else 1 (for a
    progress bar that counts micro-batches with a forward hook)."""
    return _ACTIVE[-1].n_batches if _ACTIVE else 1


def _configs(model) -> List:
    seen: Dict[int, object] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextlib.contextmanager
def packed(model, layout: PackedLayout):
    """Inside: the model's attention is :data:`PACKED_ATTENTION` over ``layout``; its
    attention implementation is restored on exit."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    configs = _configs(model)
    saved = [cfg._attn_implementation for cfg in configs]
    _ACTIVE.append(layout)
    try:
        for cfg in configs:
            cfg._attn_implementation = PACKED_ATTENTION
        yield
    finally:
        _ACTIVE.pop()
        for cfg, name in zip(configs, saved):
            cfg._attn_implementation = name


def packed_forward_backward(model, batches: List[Dict[str, torch.Tensor]],
                            masks: List[torch.Tensor], begin, margin: float = 0.0):
    """Forward ``batches`` as one packed sequence (:class:`PackedLayout`), back-propagate
    ``Σ_b L_b`` once and return ``[(L_b detached, predicted_b)]``, as
    :func:`ultraedit.batching.grouped_forward_backward` does for the same batches.

    ``masks``: each batch's captured positions (B x L bool); ``begin(mask, loss_mask, span)``
    is called once, with them packed to ``(1, T)`` (the capture's ``CaptureSession.set_mask``;
    ``span``: each request's backward span, ``ultraedit.backward_rows.backward_span``). Only the
    answer rows reach the vocabulary projection (``ultraedit.batching.answer_logits``)."""
    layout = PackedLayout(batches)
    loss_masks = [b["labels"] != -100 for b in batches]
    answer = layout.pack(loss_masks)
    spans = [backward_span(m, lm) for m, lm in zip(masks, loss_masks)]
    begin(layout.pack(masks), answer, layout.pack(spans))
    with torch.enable_grad():
        with packed(model, layout):
            rows = answer_logits(model, {"input_ids": layout.input_ids,
                                         "position_ids": layout.position_ids}, answer)
        return backward_by_batch(rows, batches, loss_masks, margin)


def capture_group(model, batches, masks, capture, margin: float, pack: bool):
    """One backward group of a turn's capture: ``(results, frames)``, per batch its
    ``(loss, predicted)`` and its ``{name: (K, G)}``, packed (:func:`packed_forward_backward`,
    the one frame split by the batches' captured rows) or batch by batch
    (:func:`ultraedit.batching.grouped_forward_backward`). ``capture``: the
    ``ultraedit.hooks.CaptureSession``."""
    if not pack:
        results = grouped_forward_backward(
            model, batches, lambda i, b: capture.set_mask(masks[i], b["labels"] != -100), margin)
        return results, capture.pop_frames()
    results = packed_forward_backward(
        model, batches, masks, lambda m, lm, span: capture.set_mask(m, lm, span=span), margin)
    (frame,) = capture.pop_frames()
    counts = [int(m.sum()) for m in masks]
    frames: List[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in masks]
    for name, (k, g) in frame.items():
        for out, kb, gb in zip(frames, k.split(counts), g.split(counts)):
            out[name] = (kb, gb)
    return results, frames


def sliding_window(model) -> Optional[int]:
    """The shortest sliding attention window of the model's configs, None without one."""
    return min((w for cfg in _configs(model)
                for w in [getattr(cfg, "sliding_window", None)] if isinstance(w, int) and w > 0),
               default=None)


def probe(model) -> Optional[str]:
    """Why ``model`` cannot run packed forwards, or None when it can: its attention must be
    transformers' ``sdpa``, and a packed forward of two random sequences (5 and 3 tokens) must
    give their padded forward's last hidden states (relative difference ≤ 1e-3 in float32,
    3e-2 in lower precision) with the packed attention called. The two forwards run on
    ``model.base_model``: hooks on the model itself (a progress bar) do not see them."""
    names = {cfg._attn_implementation for cfg in _configs(model)}
    if names != {"sdpa"}:
        return f"its attention implementation is {sorted(map(str, names))}, not 'sdpa'"
    emb = model.get_input_embeddings()
    device, vocab = emb.weight.device, emb.weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 5), generator=gen).to(device)
    attention = torch.tensor([[1] * 5, [1] * 3 + [0] * 2], device=device)
    batch = {"input_ids": ids, "attention_mask": attention}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            body = getattr(model, "base_model", model)
            padded = body(input_ids=ids, attention_mask=attention,
                          use_cache=False).last_hidden_state
            layout = PackedLayout([batch])
            with packed(model, layout):
                out = body(input_ids=layout.input_ids, position_ids=layout.position_ids,
                           use_cache=False).last_hidden_state
    except (TypeError, ValueError, RuntimeError, ImportError, AttributeError) as exc:
        return f"its packed forward failed ({type(exc).__name__}: {exc})"
    finally:
        model.train(was_training)
    if layout.calls == 0:
        return "its attention does not go through transformers' attention interface"
    want = layout.pack([padded])[0].float()
    got = out[0].float()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    tol = 1e-3 if out.dtype in (torch.float32, torch.float64) else 3e-2
    if err > tol:
        return (f"its packed forward differs from the padded one by {err:.1e} (relative; "
                f"allowed {tol:g}): its attention or positions do not follow position_ids")
    return None


_PROBED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> probe()


def unpackable(model, batches: List[Dict[str, torch.Tensor]]) -> Optional[str]:
    """Why ``batches`` cannot run packed on ``model``, or None when they can: :func:`probe`
    (run once per model) and, for a model with a sliding window, no request longer than it."""
    if model not in _PROBED:
        _PROBED[model] = probe(model)
    reason = _PROBED[model]
    window = sliding_window(model)
    if reason is None and window is not None:
        longest = max(int(b["attention_mask"].sum(1).max()) for b in batches)
        if longest > window:
            # its blocks attend to all earlier tokens of a request: exact only within the window
            reason = f"a request of {longest} tokens is longer than its sliding window ({window})"
    return reason


def on_cpu(model) -> bool:
    """Whether every parameter of ``model`` is on the CPU (where packing was first measured)."""
    return batching.device_type(model) == "cpu"


def auto_packs(model, group: int) -> bool:
    """Whether ``pack="auto"`` packs a turn of backward groups of ``group`` micro-batches (the
    model's check aside): on a model all on the CPU, always; all on CUDA devices, when a group
    holds several micro-batches. On an H200 (torch 2.11, bf16, the paper's settings, 100 edits
    in micro-batches of 10) one packed sequence per group of ten ran a turn 2.35x (Mistral-7B
    config), 5.16x (Llama-3-8B) and 4.84x (the embedded model's shape) faster than the padded
    loop (3.4-4.0x on the 7B configs in a second run), where the group alone gave 0.95-1.14x
    (``bench/results/gpu/``); one micro-batch packed alone, and models spread over devices,
    were not measured."""
    kind = batching.device_type(model)
    return kind == "cpu" or (kind == "cuda" and group > 1)


def turn_layout(editor, reqs, batches) -> Tuple[int, bool]:
    """``(backward group, packed)`` of a turn: :func:`ultraedit.batching.backward_group_size`
    and :func:`pack_turn`. ``backward_group="auto"`` groups a turn on a CUDA model only when the
    turn can pack (``pack`` not ``"off"`` and the model passes the check): there the group is
    what packing needs; a padded group measured no faster on a GPU. The check (:func:`unpackable`:
    for a model with a sliding window a host sync per micro-batch) runs at most once a turn."""
    mode, kind = editor.config.pack, batching.device_type(editor.model)
    if mode == "off" or (mode == "auto" and kind not in ("cpu", "cuda")):
        return backward_group_size(editor, reqs, batches), False
    reason = unpackable(editor.model, batches)
    devices = ("cpu", "cuda") if kind == "cuda" and reason is None else ("cpu",)
    group = backward_group_size(editor, reqs, batches, devices=devices)
    return group, pack_turn(editor, group, reason)


def pack_turn(editor, group: int, reason: Optional[str]) -> bool:
    """Whether a turn of backward groups of ``group`` micro-batches runs packed
    (``EditConfig.pack``), given ``reason``, :func:`unpackable`'s answer for its batches:
    ``"off"`` never; ``"auto"`` when :func:`auto_packs` and ``reason`` is None; ``"on"`` when
    ``reason`` is None, else a ValueError naming it."""
    mode = editor.config.pack
    if mode == "off" or (mode == "auto" and not auto_packs(editor.model, group)):
        return False
    if reason is not None and mode == "on":
        raise ValueError(f"pack='on', but {type(editor.model).__name__} cannot run packed "
                         f"forwards: {reason}; use pack='auto' or 'off'")
    return reason is None

"""A turn's backward over the positions that reach a captured row, and no others.

A turn needs the output gradients ``G`` of the edited modules at the captured positions only
(answer tokens, or the subject's last token). In a causal language model the activation at
position ``j`` influences positions ``>= j`` only, so the gradient at a position ``p`` is a sum
over paths through positions ``>= p``: the gradient rows of positions before the first captured
position of a sequence never reach a captured row. Positions after the last position with a
loss carry no gradient at all. So, per sequence ``b``, only the span

    S_b = [first captured position, last captured-or-loss position]

needs a backward; the rest of a ``B x L`` backward is work whose result is never read.

Inside :class:`LinearRowsBackward` every plain ``nn.Linear`` of the model computes its input
gradient only on the rows of that span:

    dx = zeros(B*L, d_in);  dx[S] = dy[S] @ W        (instead of dx = dy @ W)

which is what ``torch.nn.functional.linear(x, W, b)`` back-propagates, restricted to ``S``
(``index_select`` + ``mm`` + ``index_copy_``: the same products row by row). The captured
``G`` are unchanged, to the bit on the machines measured (``experiments/turn_speed.md``). The
forward is untouched: ``F.linear(x, W, b)``. No weight gradient is computed (the editor's
parameters have ``requires_grad=False`` during a capture; a module whose weight requires grad
keeps the plain ``F.linear``).

Only modules of type exactly ``nn.Linear`` whose ``forward`` is the class's own are switched
(not subclasses such as quantized layers, not modules whose forward another library wrapped,
e.g. accelerate's offload hooks, and never the output embedding), and only for inputs whose
leading shape is the captured mask's ``(B, L)`` (batch-first activations, as the capture itself
assumes); every other call is the plain ``F.linear``. With ``products``
(``ultraedit.low_precision``) the switched modules' products run in bfloat16, forward and
backward, on every call, and a span of at least :data:`LOW_PRECISION_DENSE_SHARE` of the rows
back-propagates over all of them (the plain ``F.linear`` backward: the same captured ``G`` up
to the products' rounding, as the rows before a span never reach a captured row).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LinearRowsBackward", "MaskRows", "backward_span", "switchable",
           "LOW_PRECISION_DENSE_SHARE"]

# With bfloat16 products a span holding this share of the rows or more back-propagates over all
# rows: the products are cheap there, and the gather, zeros and scatter cost more than the rows
# they skip (a lifelong-preset turn, spans of 60-70%: 1.058x faster dense; the paper's settings,
# 20%: 0.981x). Float32 products keep the span at any share (dense: 0.953x and 0.947x).
# Measured on a 2-core Intel Xeon with AMX, one thread (the project's experiments/turn_speed.md).
LOW_PRECISION_DENSE_SHARE = 0.5


def backward_span(captured: torch.Tensor, loss: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``(B x L bool)`` positions whose gradients can reach a captured row: per sequence,
    from its first captured position to its last captured or loss position (a sequence with
    none: no position). ``captured``, ``loss``: ``(B x L bool)``."""
    ends = captured if loss is None else captured | loss.to(captured.device)
    length = captured.shape[1]
    pos = torch.arange(length, device=captured.device).expand_as(captured)
    first = torch.where(captured, pos, length).amin(1, keepdim=True)
    last = torch.where(ends, pos, -1).amax(1, keepdim=True)
    return (pos >= first) & (pos <= last)


class MaskRows:
    """The rows of a ``(B x L bool)`` mask in a flattened ``(B*L, d)`` activation: ``shape``
    (``(B, L)``), ``count``, ``share`` (``count / (B*L)``) and ``on(device)``, the row index on
    that device (moved once per device: the modules of a model spread over devices each gather
    on their own)."""

    def __init__(self, mask: torch.Tensor):
        self.shape = tuple(mask.shape)
        self._flat = mask.reshape(-1).nonzero().squeeze(1)
        self.count = int(self._flat.numel())
        self.share = self.count / max(1, mask.numel())
        self._index = {mask.device: self._flat}

    def on(self, device: torch.device) -> torch.Tensor:
        idx = self._index.get(device)
        if idx is None:
            idx = self._index[device] = self._flat.to(device)
        return idx


class _LinearRows(torch.autograd.Function):
    """``F.linear(x, weight, bias)``; backward: the input gradient on the rows ``index`` of the
    flattened ``(B*L, d_out)`` output gradient, zero elsewhere; no weight or bias gradient.
    ``low``: the products run in the (low-precision) weight's dtype, the results cast back to
    the activations' (``ultraedit.low_precision``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, low):
        ctx.save_for_backward(weight, index)
        ctx.x_shape, ctx.low = x.shape, low
        if low:
            return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight, index = ctx.saved_tensors
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_in = rows.new_zeros(rows.shape[0], weight.shape[1])
        picked = rows.index_select(0, index)
        if ctx.low:
            picked = picked.to(weight.dtype).mm(weight).to(rows.dtype)
        else:
            picked = picked.mm(weight.to(rows.dtype))
        grad_in.index_copy_(0, index, picked)
        return grad_in.view(ctx.x_shape), None, None, None, None


def switchable(module: nn.Module, exclude: Tuple[nn.Module, ...] = ()) -> bool:
    """Whether a capture switches ``module`` (:class:`LinearRowsBackward`, and with it the
    low-precision products of ``ultraedit.low_precision``): a plain ``nn.Linear`` whose forward
    no other library wrapped, not in ``exclude``."""
    return (type(module) is nn.Linear and "forward" not in module.__dict__
            and not any(module is m for m in exclude))


class LinearRowsBackward:
    """Context manager: the model's plain ``nn.Linear`` modules (but ``exclude``) back-propagate
    only the rows of :meth:`set_span`'s positions. Restores every module on exit, also when an
    error is raised."""

    def __init__(self, model: nn.Module, exclude: Tuple[nn.Module, ...] = (), products=None):
        self.model = model
        self.exclude = tuple(m for m in exclude if m is not None)
        self.products = products   # ultraedit.low_precision.ProductWeights, or None
        self._switched: List[nn.Linear] = []
        self._span: Optional[MaskRows] = None

    def __enter__(self) -> "LinearRowsBackward":
        try:
            for module in self.model.modules():
                if switchable(module, self.exclude) and module.weight.device.type != "meta":
                    module.forward = self._forward_of(module)
                    self._switched.append(module)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()

    def _restore(self) -> None:
        for module in self._switched:
            module.__dict__.pop("forward", None)
        self._switched = []
        self._span = None

    def set_span(self, span: torch.Tensor) -> None:
        """The ``(B x L bool)`` positions of the next forward whose gradient rows are computed
        (:func:`backward_span`)."""
        self._span = MaskRows(span)

    def _forward_of(self, module: nn.Linear):
        products = self.products

        def forward(x: torch.Tensor) -> torch.Tensor:
            span = self._span
            if module.weight.requires_grad or (module.bias is not None
                                               and module.bias.requires_grad):
                return F.linear(x, module.weight, module.bias)
            weight, bias = (module.weight, module.bias) if products is None else products.of(module)
            low = weight.dtype != module.weight.dtype
            if (span is None or not x.requires_grad or not torch.is_grad_enabled()
                    or tuple(x.shape[:-1]) != span.shape
                    or (low and span.share >= LOW_PRECISION_DENSE_SHARE)):
                if low:
                    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
                return F.linear(x, weight, bias)
            return _LinearRows.apply(x, weight, bias, span.on(x.device), low)
        return forward

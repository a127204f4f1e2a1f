"""Capture keys and output gradients of edited modules at answer positions, with hooks.

For every edited module ``m`` (``d_in -> d_out``) and one micro-batch with answer mask
``M`` (B x L, ``labels != -100``), a forward+backward of the loss gives

    K_m = input(m)[M]            (n x d_in)    the module inputs at the answer positions
    G_m = d loss / d output(m)[M] (n x d_out)  gradients w.r.t. the module OUTPUTS

with rows in row-major order of ``M`` (batch, then position).

No weight gradient is computed or stored: inside :class:`CaptureSession` every parameter has
``requires_grad=False``; the forward hook of each edited module switches ``requires_grad`` on
for its output when nothing upstream requires grad yet (the output of the earliest edited module
is then a leaf that requires grad), so autograd builds the graph only from the earliest edited
module on and the backward stops there. A tensor hook on each output (``output.register_hook``)
receives ``G_m``. The model's own ``requires_grad`` flags and train/eval mode are restored on
exit, also when an error is raised.

The backward covers only the positions that can reach a captured row (from a sequence's first
captured position to its last captured or loss position; ``ultraedit.backward_rows``): the
model's plain ``nn.Linear`` modules compute their input gradients on those rows only, which
leaves ``G_m`` unchanged (causal attention) and skips most of the backward where the captured
positions are the last few of each prompt.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .backward_rows import LinearRowsBackward, MaskRows, backward_span

__all__ = ["CaptureSession", "check_editable"]


class _Frame:
    """One forward's captured positions and, per module, its keys and output gradients."""

    __slots__ = ("rows", "keys", "grads", "calls")

    def __init__(self, rows: MaskRows):
        self.rows = rows
        self.keys: Dict[str, torch.Tensor] = {}
        self.grads: Dict[str, torch.Tensor] = {}
        self.calls: Dict[str, int] = {}


class CaptureSession:
    """Context manager capturing ``(K, G)`` of ``modules`` at the answer positions.

    Usage::

        with CaptureSession(model, {"name": module, ...}) as cap:
            cap.set_mask(labels != -100)
            loss = compute_loss(model(...))
            loss.backward()
            kg = cap.pop()          # {"name": (K (n x d_in), G (n x d_out))}, detached

    Several forwards may run before one backward (``ultraedit.batching.grouped_forward_backward``):
    each ``set_mask`` starts a forward's frame, each frame keeps its own positions, and
    :meth:`pop_frames` gives the frames' captures in order.

    Captured tensors keep the activation dtype and device of their module. ``products``: the
    turn's ``ultraedit.low_precision.ProductWeights`` (``matmul_dtype="bfloat16"``), or None.
    """

    def __init__(self, model: nn.Module, modules: Dict[str, nn.Module], rows_backward: bool = True,
                 products=None):
        self.model = model
        self.modules = dict(modules)
        self._frames: List[_Frame] = []
        self._handles: List = []
        self._saved_flags: List[Tuple[torch.nn.Parameter, bool]] = []
        self._saved_training: Optional[bool] = None
        self._rows_backward: Optional[LinearRowsBackward] = None
        if rows_backward:
            get_out = getattr(model, "get_output_embeddings", None)
            head = get_out() if callable(get_out) else None
            self._rows_backward = LinearRowsBackward(model, exclude=(head,), products=products)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "CaptureSession":
        self._saved_flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self._saved_training = self.model.training
        try:
            for p, _ in self._saved_flags:
                p.requires_grad_(False)
            # eval: no dropout, so the captured gradients are those of the deterministic model
            self.model.eval()
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
            if self._rows_backward is not None:
                self._rows_backward.__enter__()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._rows_backward is not None:
            self._rows_backward.__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        self._handles = []
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
        self._saved_flags = []
        if self._saved_training is not None:
            self.model.train(self._saved_training)
            self._saved_training = None

    # ------------------------------------------------------------------ capture
    def set_mask(self, mask: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
                 span: Optional[torch.Tensor] = None) -> int:
        """Set the captured positions ``mask`` (B x L bool) of the next forward (a new frame;
        the frames of earlier forwards stay until :meth:`pop`); returns the number of rows.
        ``loss_mask`` (B x L bool, default ``mask``): the positions with a loss, which bound the
        backward's span (:func:`ultraedit.backward_rows.backward_span`); ``span`` (B x L bool):
        that span itself, when a row holds several sequences (``ultraedit.packing``)."""
        for what, m in (("mask", mask), ("loss_mask", loss_mask), ("span", span)):
            if m is not None and (m.dim() != 2 or m.dtype != torch.bool or m.shape != mask.shape):
                raise ValueError(f"{what} must be a 2-D bool tensor of the mask's shape, got "
                                 f"{tuple(m.shape)} {m.dtype}")
        if self._rows_backward is not None:
            self._rows_backward.set_span(backward_span(mask, loss_mask) if span is None
                                         else span)
        frame = _Frame(MaskRows(mask))
        self._frames.append(frame)
        return frame.rows.count

    @staticmethod
    def _rows(rows: MaskRows, x: torch.Tensor) -> torch.Tensor:
        batch, length = rows.shape
        # B x L x d, or the B*L x d rows some models flatten their MLP input to (OPT, MoE
        # shared experts): the same row order either way
        flat = x.dim() == 2 and x.shape[0] == batch * length
        if tuple(x.shape[:2]) != rows.shape and not flat:
            raise RuntimeError(f"activation of shape {tuple(x.shape)} does not match the answer "
                               f"mask {rows.shape} (batch x length): an edited module must see "
                               f"one row per token (a mixture-of-experts expert sees only the "
                               f"tokens routed to it and cannot be edited)")
        # only the answer rows are copied: n x d, not B x L x d
        return x.reshape(-1, x.shape[-1]).index_select(0, rows.on(x.device))

    def _make_hook(self, name: str):
        def forward_hook(module, inputs, output):
            if not self._frames:
                raise RuntimeError("CaptureSession.set_mask() must be called before the forward")
            frame = self._frames[-1]
            calls = frame.calls[name] = frame.calls.get(name, 0) + 1
            if calls > 1:
                raise RuntimeError(f"module {name!r} ran twice in one forward; an edited module "
                                   f"must be called once per forward")
            x = inputs[0] if isinstance(inputs, tuple) else inputs
            frame.keys[name] = self._rows(frame.rows, x.detach())
            out = output[0] if isinstance(output, tuple) else output
            replaced = None
            if not out.requires_grad:
                # Earliest edited module: its output starts the graph (a leaf; no weight grads).
                # The model gets a copy: some add to the module's output in place (Falcon's
                # `mlp_output += attention_output`), which a leaf that requires grad forbids.
                out.requires_grad_(True)
                replaced = out.clone()

            def grad_hook(grad):
                frame.grads[name] = self._rows(frame.rows, grad.detach())

            out.register_hook(grad_hook)
            if replaced is None:
                return None
            return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

        return forward_hook

    def pop_frames(self) -> List[Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
        """``[{name: (K, G)}]``, one per forward since the last pop, in order; clears them."""
        frames, self._frames = self._frames, []
        result = []
        for frame in frames:
            kg = {}
            for name in self.modules:
                if name not in frame.keys:
                    raise RuntimeError(f"module {name!r} was not called in the forward (is it "
                                       f"part of this model's computation?)")
                if name not in frame.grads:
                    raise RuntimeError(f"no gradient reached module {name!r}: the loss does not "
                                       f"depend on its output")
                kg[name] = (frame.keys[name], frame.grads[name])
            result.append(kg)
        return result

    def pop(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (K, G)}`` of the forwards+backward since the last pop (the frames' rows
        concatenated in order) and clear them."""
        frames = self.pop_frames()
        if not frames:
            raise RuntimeError("CaptureSession.pop(): nothing was captured (call set_mask() "
                               "and run a forward and backward first)")
        if len(frames) == 1:
            return frames[0]
        return {name: (torch.cat([f[name][0] for f in frames]),
                       torch.cat([f[name][1] for f in frames])) for name in self.modules}


def refuse_output_embedding(model: nn.Module, modules: Dict[str, nn.Module]) -> None:
    """ValueError if one of ``modules`` is the output embedding (``model.get_output_embeddings()``,
    e.g. ``lm_head``): its input is cut to the answer rows and its weight is the vocabulary
    projection, often tied to the input embeddings. Structural only (no forward): ``ultraedit
    plan`` asks it of a model without weights."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in modules.items():
        if out is not None and module is out:
            raise ValueError(
                f"module {name!r} is the output embedding (the vocabulary projection; its input "
                f"is cut to the answer positions and its weight is often tied to the input "
                f"embeddings): it cannot be edited; choose MLP projections, e.g. the "
                f"architecture's default (modules=None)")


def check_editable(model: nn.Module, modules: Dict[str, nn.Module], device) -> None:
    """Refuse modules no turn can edit, before anything is changed (ValueError naming them):

    * the output embedding (``model.get_output_embeddings()``, e.g. ``lm_head``): its input is
      cut to the answer rows (``batching.answer_logits``) and its weight is the vocabulary
      projection, often tied to the input embeddings;
    * modules a forward pass does not call (found with one forward of one token in eval mode,
      no gradient): no loss gradient reaches them.
    """
    refuse_output_embedding(model, modules)
    called = set()
    handles = [m.register_forward_hook(lambda mod, args, output, n=n: called.add(n))
               for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in modules if n not in called]
    if missing:
        raise ValueError(f"modules {missing} are not called in {type(model).__name__}'s forward "
                         f"pass, so no loss gradient reaches them and they cannot be edited")

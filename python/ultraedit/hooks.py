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


class _Slot:
    """Per-module storage for one micro-batch."""

    __slots__ = ("keys", "grads", "calls")

    def __init__(self):
        self.keys: Optional[torch.Tensor] = None
        self.grads: Optional[torch.Tensor] = None
        self.calls = 0


class CaptureSession:
    """Context manager capturing ``(K, G)`` of ``modules`` at the answer positions.

    Usage::

        with CaptureSession(model, {"name": module, ...}) as cap:
            cap.set_mask(labels != -100)
            loss = compute_loss(model(...))
            loss.backward()
            kg = cap.pop()          # {"name": (K (n x d_in), G (n x d_out))}, detached

    Captured tensors keep the activation dtype and device of their module.
    """

    def __init__(self, model: nn.Module, modules: Dict[str, nn.Module], rows_backward: bool = True):
        self.model = model
        self.modules = dict(modules)
        self._slots = {name: _Slot() for name in self.modules}
        self._handles: List = []
        self._saved_flags: List[Tuple[torch.nn.Parameter, bool]] = []
        self._saved_training: Optional[bool] = None
        self._captured: Optional[MaskRows] = None     # the captured positions
        self._rows_backward: Optional[LinearRowsBackward] = None
        if rows_backward:
            get_out = getattr(model, "get_output_embeddings", None)
            head = get_out() if callable(get_out) else None
            self._rows_backward = LinearRowsBackward(model, exclude=(head,))

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
    def set_mask(self, mask: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> int:
        """Set the captured positions ``mask`` (B x L bool) for the next forward; returns the
        number of rows. ``loss_mask`` (B x L bool, default ``mask``): the positions with a loss,
        which bound the backward's span (:func:`ultraedit.backward_rows.backward_span`)."""
        for what, m in (("mask", mask), ("loss_mask", loss_mask)):
            if m is not None and (m.dim() != 2 or m.dtype != torch.bool or m.shape != mask.shape):
                raise ValueError(f"{what} must be a 2-D bool tensor of the mask's shape, got "
                                 f"{tuple(m.shape)} {m.dtype}")
        if self._rows_backward is not None:
            self._rows_backward.set_span(backward_span(mask, loss_mask))
        self._captured = MaskRows(mask)
        for slot in self._slots.values():
            slot.keys = slot.grads = None
            slot.calls = 0
        return self._captured.count

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._captured
        if tuple(x.shape[:2]) != rows.shape:
            raise RuntimeError(f"activation of shape {tuple(x.shape)} does not match the answer "
                               f"mask {rows.shape} (batch x length)")
        # only the answer rows are copied: n x d, not B x L x d
        return x.reshape(-1, x.shape[-1]).index_select(0, rows.on(x.device))

    def _make_hook(self, name: str):
        slot = self._slots[name]

        def forward_hook(module, inputs, output):
            if self._captured is None:
                raise RuntimeError("CaptureSession.set_mask() must be called before the forward")
            slot.calls += 1
            if slot.calls > 1:
                raise RuntimeError(f"module {name!r} ran twice in one forward; an edited module "
                                   f"must be called once per forward")
            x = inputs[0] if isinstance(inputs, tuple) else inputs
            slot.keys = self._rows(x.detach())
            out = output[0] if isinstance(output, tuple) else output
            if not out.requires_grad:
                # Earliest edited module: its output starts the graph (a leaf; no weight grads).
                out.requires_grad_(True)

            def grad_hook(grad):
                slot.grads = self._rows(grad.detach())

            out.register_hook(grad_hook)
            return None

        return forward_hook

    def pop(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Return ``{name: (K, G)}`` of the last forward+backward and clear the slots."""
        result = {}
        for name, slot in self._slots.items():
            if slot.keys is None:
                raise RuntimeError(f"module {name!r} was not called in the forward (is it part "
                                   f"of this model's computation?)")
            if slot.grads is None:
                raise RuntimeError(f"no gradient reached module {name!r}: the loss does not "
                                   f"depend on its output")
            result[name] = (slot.keys, slot.grads)
            slot.keys = slot.grads = None
            slot.calls = 0
        return result


def check_editable(model: nn.Module, modules: Dict[str, nn.Module], device) -> None:
    """Refuse modules no turn can edit, before anything is changed (ValueError naming them):

    * the output embedding (``model.get_output_embeddings()``, e.g. ``lm_head``): its input is
      cut to the answer rows (``batching.answer_logits``) and its weight is the vocabulary
      projection, often tied to the input embeddings;
    * modules a forward pass does not call (found with one forward of one token in eval mode,
      no gradient): no loss gradient reaches them.
    """
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in modules.items():
        if out is not None and module is out:
            raise ValueError(
                f"module {name!r} is the output embedding (the vocabulary projection; its input "
                f"is cut to the answer positions and its weight is often tied to the input "
                f"embeddings): it cannot be edited; choose MLP projections, e.g. the "
                f"architecture's default (modules=None)")
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

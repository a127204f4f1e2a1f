"""A turn's matrix products in bfloat16 (``EditConfig.matmul_dtype = "bfloat16"``).

A turn's time is almost all the model's forwards and backwards, and those are almost all the
``nn.Linear`` products. With ``matmul_dtype="bfloat16"``, while a turn captures, every plain
``nn.Linear`` with a float32 weight computes

    y = F.linear(x.bfloat16(), W_bf16, b_bf16).float()          (forward)
    dx = (dy.bfloat16() @ W_bf16).float()                        (backward, input gradient only)

Everything between the products (norms, attention softmax, activations, residual sums, the loss)
stays in the activations' float32; so do the captured keys ``K`` (the edited modules' inputs)
and output gradients ``G``, which carry the bfloat16 products' rounding (3 significant digits)
into the solver, whose own work is unchanged. The evaluation and every other forward outside a
turn's capture use the model as it is.

Which weights: the ``nn.Linear`` modules that :class:`~ultraedit.backward_rows.LinearRowsBackward`
switches (plain ``nn.Linear``, forward not wrapped by another library, not the output embedding),
with float32 weights. The weights the turn does not edit are copied to bfloat16 once per turn
(:class:`ProductWeights`; ~half their float32 bytes, freed when the turn ends); the edited
modules' weights change at every step and are cast at each call.

Equivalent PyTorch, for one frozen ``linear`` module::

    w16 = linear.weight.detach().bfloat16()
    y = torch.nn.functional.linear(x.bfloat16(), w16).float()

Where it pays: CPUs with native bfloat16 products (``avx512_bf16`` or AMX; oneDNN) and GPUs.
Measured on a 2-core Zen 4 EPYC (one thread, the embedded model's preset, 2 turns of 25 edits):
forward and backward 1.7-2.3x faster; on a CPU without them the products are emulated and
slower, and :class:`ProductWeights` warns. What it costs in edit quality (over 1,000 edits:
teacher-forced locality -0.011, WILD-style -0.023) is measured in the project's
``experiments/turn_speed.md``.
"""

from __future__ import annotations

import warnings
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["MATMUL_DTYPES", "ProductWeights", "product_weights"]

# EditConfig.matmul_dtype -> the products' dtype (None: the weights' own)
MATMUL_DTYPES = {"model": None, "bfloat16": torch.bfloat16}

_warned_cpu = False


def _cpu_has_native_bf16() -> Optional[bool]:
    """Whether oneDNN computes bfloat16 products natively on this CPU (None: unknown)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


class ProductWeights:
    """One turn's low-precision weights: ``of(module)`` is ``(weight, bias)`` for the module's
    products, a copy made at the first call for a weight the turn does not edit, a fresh cast at
    every call for an edited one (it changes at every step), the module's own tensors where the
    weight is not float32."""

    def __init__(self, dtype: torch.dtype, edited: Iterable[nn.Module]):
        self.dtype = dtype
        self._edited = {id(m) for m in edited}
        self._copies: Dict[int, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    def of(self, module: nn.Linear) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        weight, bias = module.weight, module.bias
        if weight.dtype != torch.float32:
            return weight, bias
        if id(module) in self._edited:
            return weight.to(self.dtype), None if bias is None else bias.to(self.dtype)
        pair = self._copies.get(id(module))
        if pair is None:
            _warn_if_emulated(weight.device)
            pair = self._copies[id(module)] = (
                weight.detach().to(self.dtype),
                None if bias is None else bias.detach().to(self.dtype))
        return pair

    @property
    def nbytes(self) -> int:
        """Bytes held by the copies."""
        return sum(t.numel() * t.element_size() for pair in self._copies.values()
                   for t in pair if t is not None)


def _warn_if_emulated(device: torch.device) -> None:
    global _warned_cpu
    if device.type != "cpu" or _warned_cpu:
        return
    _warned_cpu = True
    if _cpu_has_native_bf16() is False:
        warnings.warn("matmul_dtype='bfloat16' on a CPU without native bfloat16 products "
                      "(no avx512_bf16 or AMX): they are emulated, likely slower than float32; "
                      "matmul_dtype='model' keeps the weights' dtype", stacklevel=4)


def product_weights(matmul_dtype: str, edited: Iterable[nn.Module]) -> Optional[ProductWeights]:
    """A turn's :class:`ProductWeights` for ``EditConfig.matmul_dtype``, or None (``"model"``)."""
    dtype = MATMUL_DTYPES[matmul_dtype]
    return None if dtype is None else ProductWeights(dtype, edited)

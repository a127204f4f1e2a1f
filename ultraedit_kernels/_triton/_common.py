"""Shared plumbing of the Triton kernels: availability, dtype maps, ahead-of-time specs.

Availability of the ``triton`` backend: Triton importable (this module imports it, so a failed
import keeps the modules from registering at all) AND either a CUDA device, or
``TRITON_INTERPRET=1`` exported before Python started (the kernels then run on the CPU through
Triton's interpreter).  ``auto`` picks the kernels only for CUDA tensors outside the
interpreter: interpreting is for testing, never faster than the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import triton
import triton.language as tl  # noqa: F401  (re-exported for the kernel modules)
from .._optional_backends import NOT_ON_THIS_DEVICE_CPU, not_on_this_device

# triton.jit decides at decoration time whether it returns an interpreted function, so the
# value at import is the one that matters (setting the variable later has no effect).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.float64: "fp64"}
AOT_TARGETS = (("cuda", 80, 32), ("cuda", 90, 32))


def available(device: torch.device) -> Optional[str]:
    """``None`` when the Triton kernels can run on ``device``, else why not and the fix."""
    if device.type == "cuda":
        if INTERPRET:
            return None
        major, _minor = torch.cuda.get_device_capability(device)
        if major < 7:
            return (f"Triton needs compute capability >= 7.0; {torch.cuda.get_device_name(device)} "
                    f"has {major}.{_minor}")
        return None
    if device.type == "cpu":
        if INTERPRET:
            return None
        return NOT_ON_THIS_DEVICE_CPU
    return not_on_this_device(device.type)


def auto_ok(*tensors: Any) -> bool:
    """``auto`` uses the kernels only on CUDA (never the interpreter) for supported dtypes."""
    if INTERPRET:
        return False
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            if t.device.type != "cuda" or t.dtype not in SUPPORTED_DTYPES:
                return False
    return True


def launch_dtype(*tensors: torch.Tensor) -> Optional[torch.dtype]:
    """The one dtype the kernels read the inputs in, or ``None`` to use the reference (float64)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype in SUPPORTED_DTYPES else None


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit column stride (a copy only when it has none)."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


@dataclass(frozen=True)
class AotSpec:
    """One configuration a launcher can choose, as ``triton.compile`` takes it."""

    name: str
    kernel: Any                       # the triton.jit function (not interpreted)
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: int
    divisible: Tuple[str, ...] = field(default=())   # args hinted 16-divisible (aligned case)

    def source(self):
        names = self.kernel.arg_names
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in self.divisible}
        sig = dict(self.signature)
        for k in self.constexprs:
            sig[k] = "constexpr"
        return triton.compiler.ASTSource(self.kernel, sig, constexprs=dict(self.constexprs),
                                         attrs=attrs)

"""One tolerance table per dtype for the backend tests, and the error measure they use.

Errors are relative Frobenius-norm errors against a float64 reference:
``||x - ref|| / ||ref||``.  Inputs in bf16/fp16 are compared against the float64 result of the
*same rounded inputs*, so the table bounds the op's own arithmetic, not the input rounding.
"""
import torch

# relative error allowed for an O(d)-reduction elementwise op (pseudo-values, stats)
ELEMENTWISE = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6, torch.float64: 1e-12}
# relative error allowed for the solved shift (Gram + Cholesky + products), per solve dtype
SOLVE = {"dual": 1e-5, "primal": 1e-2, "float64": 1e-10}
# relative error of the in-place apply, per *weight* dtype (one rounding of the result)
APPLY = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))

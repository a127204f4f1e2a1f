"""The one tolerance table of the backend tests, and the one rule that reads it.

Measure: the relative Frobenius error against a float64 evaluation of the same math on the
*same rounded inputs* (bf16/fp16 inputs are compared with the float64 result of those rounded
values), ``rel_err(x, ref) = ||x - ref|| / ||ref||``, so a bound is about the op's own
arithmetic, never about input rounding.

Rule: ``rel_err(op, ref) <= FACTOR * rel_err(plain, ref) + TOLERANCES[kind][dtype]``, where
``plain`` is the same math written in plain PyTorch in the same precision, computed in the same
test on the same machine (``plain_err = 0`` where a test has no such baseline: the table entry is
then the whole bound).  The table's entries are floors about 10x above the errors measured on
the test shapes with more than one BLAS, so that no test depends on one BLAS's rounding; a
property that holds exactly (symmetry by construction, unchanged state, the same backend run
twice) is asserted with ``torch.equal``, not with a tolerance.

``dtype`` is the input dtype for the elementwise kinds, the weight dtype for ``apply``, and the
compute dtype (float32 or float64) for the solves.
"""
import torch

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

FACTOR = 2.0

TOLERANCES = {
    # pseudo-values: an O(d_in) reduction, then one scaling per element (float32 arithmetic)
    "pseudo_values": {F32: 2e-6, BF16: 2e-6, F16: 2e-6, F64: 1e-12},
    # running statistics: float64 merges of float32 (or float64) rows
    "stats_mean": {F32: 1e-6, BF16: 1e-6, F16: 1e-6, F64: 1e-13},
    "stats_m2": {F32: 2e-6, BF16: 2e-6, F16: 2e-6, F64: 1e-12},
    # the statistics of rows far from zero (offset 1e4 x their spread): float32-accurate needs
    # the shifted sums; float32 sums of squares lose every digit, a float32 two-pass gives 5e-6
    "stats_offset_mean": {F32: 1e-7},
    "stats_offset_m2": {F32: 1e-6},
    # K Kᵀ + λI / Kᵀ K + λI: with the plain float32 matmul as the baseline
    "gram": {F32: 2e-7, BF16: 2e-7, F16: 2e-7, F64: 1e-14},
    # Cholesky solve of a well-conditioned SPD system, with torch.linalg as the baseline
    "spd_solve": {F32: 1e-6, F64: 1e-13},
    # the solved shift ΔW against the float64 oracle: the dual N x N system (well conditioned),
    # the primal d_in x d_in one (conditioned like KᵀK: float32 loses digits), float64 either way
    "dual": {F32: 1e-5, F64: 1e-10},
    "primal": {F32: 1e-2, F64: 1e-10},
    # W += ΔW in place, per weight dtype: one rounding of the result
    "apply": {F32: 1e-6, F64: 1e-12, BF16: 8e-3, F16: 1e-3},
    # two evaluations of one float32 formula in different orders (factors vs dense ΔW, ...)
    "reorder": {F32: 1e-6, F64: 1e-13},
    # a turn's captured keys and gradients, and its ΔW, with the model's linear products in
    # bfloat16 (matmul_dtype): each product rounds to 8 significant bits, through the layers
    "bf16_products": {BF16: 5e-2},
    # on a GPU: tensor-core tiles (products exact, float32 accumulation in another order)
    "gpu": {F32: 1e-5, BF16: 1e-5, F16: 1e-5, F64: 1e-10},
}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def bound(kind: str, dtype: torch.dtype, plain_err: float = 0.0) -> float:
    """The largest error the rule allows (see the module docstring)."""
    return FACTOR * plain_err + TOLERANCES[kind][dtype]


def assert_within(x: torch.Tensor, ref: torch.Tensor, kind: str, dtype: torch.dtype,
                  plain: torch.Tensor = None) -> None:
    """``rel_err(x, ref) <= bound(kind, dtype, rel_err(plain, ref))``, with both errors in the
    message."""
    plain_err = 0.0 if plain is None else rel_err(plain, ref)
    err = rel_err(x, ref)
    assert err <= bound(kind, dtype, plain_err), (
        f"{kind}/{dtype}: error {err:.3e} > {FACTOR} x plain {plain_err:.3e} + "
        f"{TOLERANCES[kind][dtype]:.1e}")


# The same entries under the names of the earlier per-kind tables (views, not other values).
ELEMENTWISE = TOLERANCES["pseudo_values"]
APPLY = TOLERANCES["apply"]
SOLVE = {"dual": TOLERANCES["dual"][F32], "primal": TOLERANCES["primal"][F32],
         "float64": TOLERANCES["dual"][F64]}

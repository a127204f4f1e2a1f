"""ultraedit_kernels: the UltraEdit parameter shift as exact, fast tensor ops.

Public API (plain tensors in, plain tensors out; no transformers dependency)::

    RunningStats(dim, compat="fixed" | "official")
    FrozenStats(mean, std)          statistics kept elsewhere (another library's normalizer)
    pseudo_values(keys, values_grad, stats, lr=1e-6)                  -> V  (N x d_out)
    shift_factors(keys, values_grad, stats, lr=1e-6, ridge=1.0)       -> A  (N x d_out), ΔW = Kᵀ A
    param_shift(keys, values_grad, stats, lr, ridge, method="auto")   -> ΔW (d_in x d_out)
    apply_shift_(weight_or_module, keys, A, layout=None, check=True)  in place
    gram(x, ridge, rows=True), spd_solve(a, b)                        building blocks
    spd_factor(a) -> (L, info), spd_solve_factored(L, b)              factor once, solve many

Backends are chosen with ``ULTRAEDIT_BACKEND`` (auto | torch | triton | cuda | cpp); ``auto``
uses a native implementation only where this machine's calibration measured it faster than
the PyTorch reference (``ULTRAEDIT_CALIBRATION``, see :mod:`.calibration`).
``python -m ultraedit_kernels.info`` prints what is built, where each op dispatches and the
calibration.  Importing this package never initializes CUDA, never calibrates, and never
fails because an optional backend (Triton, the compiled extension) is missing.
"""
from __future__ import annotations

from .running_stats import EPS, FrozenStats, RunningStats
from .stats_update import stats_update_op
from .stats_update2 import stats_update2_op, update_stats_pair
from .pseudo_values import pseudo_values, pseudo_values_op
from .gram import gram, gram_op
from .spd_solve import spd_solve, spd_solve_op
from .spd_factor import spd_factor, spd_factor_op, spd_solve_factored, spd_solve_factored_op
from .apply_shift import apply_shift_, apply_shift_op, layout_of
from .param_shift import METHODS, SolveError, choose_method, param_shift, shift_factors
from . import _optional_backends  # noqa: F401  (registers the Triton kernels, imported on first need)

__version__ = "0.1.0"

__all__ = [
    "EPS", "METHODS", "FrozenStats", "RunningStats", "SolveError", "apply_shift_", "choose_method", "gram",
    "layout_of", "param_shift", "pseudo_values", "shift_factors", "spd_factor", "spd_solve",
    "spd_solve_factored", "spd_factor_op", "spd_solve_factored_op",
    "apply_shift_op", "gram_op", "pseudo_values_op", "spd_solve_op", "stats_update_op",
    "stats_update2_op", "update_stats_pair",
]

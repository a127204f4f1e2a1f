"""The UltraEdit parameter shift: ridge least squares on raw keys with normalized pseudo-values.

Formula (``K`` keys N x d_in, ``V`` pseudo-values N x d_out from :mod:`.pseudo_values`)::

    ΔW = argmin ||K ΔW - V||² + λ||ΔW||²
       = (KᵀK + λI)⁻¹ KᵀV          primal: a d_in x d_in SPD system
       = Kᵀ (KKᵀ + λI)⁻¹ V         dual:   an N x N SPD system (Woodbury)

Both are solved by Cholesky.  The dual form is cheaper (O(N²d) instead of O(d³)) and far
better conditioned in float32 whenever N < d_in; ``method="auto"`` picks it then.

``shift_factors`` returns the dual factor ``A = (KKᵀ + λI)⁻¹ V`` (N x d_out) so that the
update can be applied in place as a rank-N product (``apply_shift_``) without a dense ΔW.

Equivalent PyTorch (float64 oracle)::

    K = keys.double(); V = pseudo_values(...).double()
    dW = torch.linalg.solve(K.T @ K + ridge * torch.eye(d_in), K.T @ V)
"""
from __future__ import annotations

import logging

import torch

from ._profiling import nvtx_range
from ._validation import check_keys_grads, check_ridge
from .gram import gram_op
from .pseudo_values import check_stats_for, pseudo_values, pseudo_values_op
from .running_stats import EPS, RunningStats
from .spd_solve import spd_solve_op, spd_solve_reference

METHODS = ("auto", "dual", "primal")
_log = logging.getLogger("ultraedit_kernels")


class SolveError(RuntimeError):
    """The regularized system could not be factorized even in float64."""


def choose_method(n_rows: int, d_in: int) -> str:
    """``dual`` when the N x N system is no larger than the d_in x d_in one."""
    return "dual" if n_rows <= d_in else "primal"


def _solve_checked(system: torch.Tensor, rhs: torch.Tensor, what: str) -> torch.Tensor:
    """Cholesky solve; on a failed factorization retry once in float64 with the reference."""
    solution, info = spd_solve_op(system, rhs)
    if int(info.max()) == 0:
        return solution
    _log.warning("%s: Cholesky factorization failed in %s (info=%d); retrying in float64 with "
                 "the reference solver", what, system.dtype, int(info.max()))
    solution64, info64 = spd_solve_reference(system.double(), rhs.double())
    if int(info64.max()) != 0 or not bool(torch.isfinite(solution64).all()):
        raise SolveError(f"{what}: the system is not positive definite even in float64 "
                         f"(info={int(info64.max())}); the features are degenerate or the ridge "
                         f"is too small")
    return solution64.to(rhs.dtype)


def _validated(keys, values_grad, stats, ridge):
    check_keys_grads(keys, values_grad)
    check_stats_for(keys, values_grad, stats)
    check_ridge(ridge)


def shift_factors(keys: torch.Tensor, values_grad: torch.Tensor, stats,
                  lr: float = 1e-6, ridge: float = 1.0) -> torch.Tensor:
    """Dual factor ``A = (KKᵀ + λI)⁻¹ V`` (N x d_out, float32) with ``ΔW = keysᵀ A``.

    ``stats`` (a RunningStats, or FrozenStats for statistics kept elsewhere) must already
    include this turn's rows.  Never forms a d_in x d_in matrix.
    """
    _validated(keys, values_grad, stats, ridge)
    with nvtx_range("ultraedit/pseudo_values"):
        values = pseudo_values_op(keys, values_grad, stats.mean, stats.std, float(lr), EPS)
    with nvtx_range("ultraedit/gram"):
        system = gram_op(keys, float(ridge), True)
    with nvtx_range("ultraedit/solve"):
        return _solve_checked(system, values, "shift_factors (dual)")


def param_shift(keys: torch.Tensor, values_grad: torch.Tensor, stats,
                lr: float = 1e-6, ridge: float = 1.0, method: str = "auto") -> torch.Tensor:
    """Dense UltraEdit parameter shift ``ΔW`` (d_in x d_out, float32).

    This one call is the drop-in entry point for other libraries: pass the keys (module
    inputs at the answer positions), the gradients of the loss w.r.t. the module outputs,
    and statistics that already include these rows.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _validated(keys, values_grad, stats, ridge)
    if method == "auto":
        method = choose_method(keys.shape[0], keys.shape[1])
    keys32 = keys.float()
    if method == "dual":
        factors = shift_factors(keys, values_grad, stats, lr, ridge)
        return keys32.T @ factors
    with nvtx_range("ultraedit/pseudo_values"):
        values = pseudo_values_op(keys, values_grad, stats.mean, stats.std, float(lr), EPS)
    with nvtx_range("ultraedit/gram"):
        system = gram_op(keys, float(ridge), False)
    with nvtx_range("ultraedit/solve"):
        return _solve_checked(system, keys32.T @ values, "param_shift (primal)")


__all__ = ["param_shift", "shift_factors", "pseudo_values", "choose_method", "SolveError",
           "METHODS"]

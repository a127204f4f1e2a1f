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
from ._validation import check_keys_grads, check_lr, check_ridge, compute_dtype, without_grad
from .gram import gram_call
from .pseudo_values import check_result, check_stats_for, pseudo_values, pseudo_values_call
from .running_stats import EPS, RunningStats
from .spd_solve import spd_solve_call, spd_solve_reference

METHODS = ("auto", "dual", "primal")
_log = logging.getLogger("ultraedit_kernels")


class SolveError(RuntimeError):
    """The regularized system could not be factorized even in float64."""


def choose_method(n_rows: int, d_in: int) -> str:
    """``dual`` when the N x N system is no larger than the d_in x d_in one."""
    return "dual" if n_rows <= d_in else "primal"


def _solve_checked(system: torch.Tensor, rhs: torch.Tensor, what: str,
                   inputs=None) -> torch.Tensor:
    """Cholesky solve; on a failed factorization retry once in float64 with the reference.

    ``inputs`` (keys, values_grad), when given, are inspected on failure only, so that NaN/Inf
    features are reported as such rather than as an indefinite system.
    """
    solution, info = spd_solve_call(system, rhs)
    if int(info.max()) == 0:
        return solution
    if inputs is not None:
        check_keys_grads(*inputs, finite=True)
    _log.warning("%s: Cholesky factorization failed in %s (info=%d); retrying in float64 with "
                 "the reference solver", what, system.dtype, int(info.max()))
    solution64, info64 = spd_solve_reference(system.double(), rhs.double())
    if int(info64.max()) != 0 or not bool(torch.isfinite(solution64).all()):
        raise SolveError(f"{what}: the system is not positive definite even in float64 "
                         f"(info={int(info64.max())}); the features are degenerate or the ridge "
                         f"is too small")
    return solution64.to(rhs.dtype)


def _validated(keys, values_grad, stats, lr, ridge):
    """Shape, statistics and scalar checks; finiteness is checked on the result (one pass)."""
    check_keys_grads(keys, values_grad, finite=False)
    check_stats_for(keys, values_grad, stats)
    check_lr(lr)
    check_ridge(ridge)


def _factors(keys, values_grad, stats, lr, ridge):
    dtype = compute_dtype(keys, values_grad)
    with nvtx_range("ultraedit/pseudo_values"):
        values = pseudo_values_call(keys, values_grad, stats.mean, stats.std, float(lr), EPS)
    with nvtx_range("ultraedit/gram"):
        # float32 keys with float64 gradients: the system in float64 as well
        system = gram_call(keys.double() if dtype == torch.float64 else keys, float(ridge), True)
    with nvtx_range("ultraedit/solve"):
        factors = _solve_checked(system, values, "shift_factors (dual)", (keys, values_grad))
    check_result("shift_factors", factors, keys, values_grad)
    return factors


@without_grad
def shift_factors(keys: torch.Tensor, values_grad: torch.Tensor, stats,
                  lr: float = 1e-6, ridge: float = 1.0) -> torch.Tensor:
    """Dual factor ``A = (KKᵀ + λI)⁻¹ V`` (N x d_out) with ``ΔW = keysᵀ A``.

    float32, or float64 when ``keys`` or ``values_grad`` is float64.  ``stats`` (a
    RunningStats, or FrozenStats for statistics kept elsewhere) must already include this
    turn's rows.  Never forms a d_in x d_in matrix.  Raises ``ValueError`` for NaN/Inf
    features, a bad ``lr`` or ``ridge``, and :class:`SolveError` when the system cannot be
    factorized even in float64.

    Equivalent PyTorch::

        V = pseudo_values(keys, values_grad, stats, lr)
        A = torch.cholesky_solve(V, torch.linalg.cholesky(keys @ keys.T + ridge * I))
    """
    _validated(keys, values_grad, stats, lr, ridge)
    return _factors(keys, values_grad, stats, lr, ridge)


@without_grad
def param_shift(keys: torch.Tensor, values_grad: torch.Tensor, stats,
                lr: float = 1e-6, ridge: float = 1.0, method: str = "auto") -> torch.Tensor:
    """Dense UltraEdit parameter shift ``ΔW`` (d_in x d_out; float32, float64 for float64 input).

    This one call is the drop-in entry point for other libraries: pass the keys (module
    inputs at the answer positions), the gradients of the loss w.r.t. the module outputs,
    and statistics that already include these rows.

    Equivalent PyTorch (``method="dual"``; ``"primal"`` solves ``(KᵀK + λI) ΔW = KᵀV``)::

        V = pseudo_values(keys, values_grad, stats, lr)
        dW = keys.T @ torch.cholesky_solve(V, torch.linalg.cholesky(keys @ keys.T + ridge * I))
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _validated(keys, values_grad, stats, lr, ridge)
    if method == "auto":
        method = choose_method(keys.shape[0], keys.shape[1])
    dtype = compute_dtype(keys, values_grad)
    keys_c = keys.to(dtype)
    if method == "dual":
        return keys_c.T @ _factors(keys, values_grad, stats, lr, ridge)
    with nvtx_range("ultraedit/pseudo_values"):
        values = pseudo_values_call(keys, values_grad, stats.mean, stats.std, float(lr), EPS)
    with nvtx_range("ultraedit/gram"):
        system = gram_call(keys_c, float(ridge), False)
    with nvtx_range("ultraedit/solve"):
        shift = _solve_checked(system, keys_c.T @ values, "param_shift (primal)",
                               (keys, values_grad))
    check_result("param_shift", shift, keys, values_grad)
    return shift


__all__ = ["param_shift", "shift_factors", "pseudo_values", "choose_method", "SolveError",
           "METHODS"]

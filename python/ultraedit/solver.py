"""Captured rows -> the update of one module: one regularized least-squares system, term by term.

For a module ``d_in -> d_out`` with this step's keys ``K`` (N x d_in) and output gradients
``G`` (N x d_out), and statistics that already hold this turn's rows::

    V   = pseudo_values(K, G, stats, lr)            = -lr ||k̂_i||² ĝ_i        (N x d_out)
          (``whitener``: ĝ = (g - m_g) Σ_g^{-1/2}, ``ultraedit.whitening``)
    ΔW  = argmin ||K' ΔW - V'||² + ΔWᵀ P ΔW
        = (K'ᵀK' + P)⁻¹ K'ᵀV'                                                (d_in x d_out)

with the terms beyond the paper composed into ``K'``, ``V'`` and ``P``:

* **held rows** (``hold``, N bool): ``V'[i] = 0`` for requests the model already predicts;
* **mean-key row** (``protect_mean = α > 0``): one more row ``sqrt(α N) μ_k`` with target 0
  (``μ_k`` = the running mean of the keys, ``stats.mean[:d_in]``);
* **prior** ``P = ν M + μ K_pᵀK_p + λ I`` (:class:`Prior`): the key memory ``M = Σ_t K_tᵀK_t``
  of earlier turns and the preserved subjects' keys ``K_p`` (without the subjects this turn
  edits); without them ``P = λ I`` (the paper).

How it is solved (through ``ultraedit_kernels``: ``pseudo_values_op``, ``gram``, ``spd_solve``,
``spd_factor``/``spd_solve_factored``;
a failed factorization is retried once in float64):

* ``P = λI``, ``N' <= d_in``: the dual factor ``A = (K'K'ᵀ + λI)⁻¹ V'`` (N' x d_out) with
  ``ΔW = K'ᵀA``, applied as a rank-N' update (``kind="dual"``, ``keys = K'``);
* ``P = λI``, ``N' > d_in``: the dense primal ``ΔW = (K'ᵀK' + λI)⁻¹K'ᵀV'`` (``kind="primal"``);
* a prior: Woodbury in float64, ``ΔW = Y (I + K'Y)⁻¹ V'`` with ``Y = P⁻¹K'ᵀ`` (d_in x N'),
  applied as the rank-N' update ``ΔW = (Yᵀ)ᵀ A`` (``kind="dual"``, ``keys = Yᵀ``). ``P`` is
  constant during a turn, so it is factored once per turn and module (``spd_factor``) and
  every step solves with that factor (``spd_solve_factored``).

Equivalent PyTorch (float64)::

    K1, V1 = torch.cat([K, row]), torch.cat([V.masked_fill(hold[:, None], 0), zeros])
    dW = torch.linalg.solve(K1.T @ K1 + nu * M + mu * Kp.T @ Kp + ridge * I, K1.T @ V1)
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from ultraedit_kernels import (EPS, SolveError, choose_method, gram, pseudo_values_op, spd_factor,
                               spd_solve, spd_solve_factored)

from .whitening import Whitener, whitened_pseudo_values

__all__ = ["Update", "Prior", "module_prior", "step_values", "solve", "check_updates",
           "first_non_finite", "SolveError"]

_log = logging.getLogger("ultraedit")


@dataclass
class Update:
    """One module's update: ``kind="dual"``: ``ΔW = keysᵀ tensor`` (tensor N' x d_out);
    ``kind="primal"``: ``ΔW = tensor`` (d_in x d_out)."""

    kind: str
    tensor: torch.Tensor
    keys: torch.Tensor

    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


class Prior:
    """``P = Σ_j w_j T_j + λI`` (float64, d_in x d_in, SPD with eigenvalues >= λ), factored
    once: ``terms`` are ``(T_j, w_j)`` pairs (key memory ``(M, ν)``, preserved keys
    ``(K_pᵀK_p, μ)``); None terms are skipped."""

    def __init__(self, terms: Sequence, ridge: float):
        terms = [(t, w) for t, w in terms if t is not None]
        if not terms:
            raise ValueError("a prior needs at least one term")
        system = torch.zeros_like(terms[0][0], dtype=torch.float64)
        for term, weight in terms:
            system.add_(term.to(device=system.device, dtype=torch.float64), alpha=weight)
        system.diagonal().add_(ridge)
        factor, info = spd_factor(system)   # once: P is shared by all steps of a turn
        if int(info) != 0:
            raise FloatingPointError(f"the system νM + μP + λI of the key memory and preserved "
                                     f"keys is not positive definite (info={int(info)}); they hold "
                                     f"non-finite values")
        self.factor = factor

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``P⁻¹ rhs`` (float64)."""
        return spd_solve_factored(self.factor, rhs)


def module_prior(state, name: str, config, subjects) -> Optional[Prior]:
    """The prior ``P = νM + μK_pᵀK_p + λI`` of module ``name`` in a turn that edits ``subjects``:
    ``state``'s key memory ``M`` (``ν = config.memory``) and preserved keys ``K_p`` without those
    subjects' (``μ = config.preserve``), ``λ = config.ridge``; None without either (``P = λI``)."""
    memory = state.memory.get(name) if config.memory > 0 else None
    pk = state.preserved.get(name) if config.preserve > 0 else None
    terms = [(None if memory is None else memory.gram, config.memory),
             (None if pk is None else pk.gram_without(subjects), config.preserve)]
    return Prior(terms, config.ridge) if memory or pk else None


def _spd_solve(system: torch.Tensor, rhs: torch.Tensor, what: str) -> torch.Tensor:
    """``system⁻¹ rhs`` by Cholesky; a failed factorization is retried once in float64."""
    solution, info = spd_solve(system, rhs)
    if int(info.max()) == 0:
        return solution
    _log.warning("%s: Cholesky factorization failed in %s (info=%d); retrying in float64",
                 what, system.dtype, int(info.max()))
    solution64, info64 = spd_solve(system.double(), rhs.double())
    if int(info64.max()) != 0 or not bool(torch.isfinite(solution64).all()):
        raise SolveError(f"{what}: the system is not positive definite even in float64 "
                         f"(info={int(info64.max())}); the features are degenerate or the ridge "
                         f"is too small")
    return solution64.to(rhs.dtype)


def step_values(keys: torch.Tensor, grads: torch.Tensor, stats, *, lr: float,
                hold: Optional[torch.Tensor] = None,
                whitener: Optional[Whitener] = None) -> torch.Tensor:
    """The step's pseudo-values ``V`` (N x d_out; float32, float64 for float64 keys):
    ``-lr ||k̂||² ĝ`` with the paper's per-coordinate ``ĝ`` or, given ``whitener``, the whitened
    one; the rows of ``hold`` (N bool, requests already predicted) are 0."""
    c = torch.float64 if keys.dtype == torch.float64 else torch.float32
    if whitener is None:
        v = pseudo_values_op(keys, grads, stats.mean, stats.std, float(lr), EPS).to(c)
    else:
        v = whitened_pseudo_values(keys, grads, stats, whitener, float(lr), EPS)
    if hold is not None:
        v = v.masked_fill(hold.to(v.device)[:, None], 0.0)
    return v


def solve(keys: torch.Tensor, grads: torch.Tensor, stats, *, lr: float, ridge: float,
          hold: Optional[torch.Tensor] = None, protect_mean: float = 0.0,
          prior: Optional[Prior] = None, whitener: Optional[Whitener] = None) -> Update:
    """The update of one module for one step (see the module docstring for the system).

    ``keys`` (N x d_in) and ``grads`` (N x d_out) are this step's captured rows, already
    checked finite; ``stats`` (RunningStats on their device) holds this turn's rows;
    ``whitener`` (on their device), when given, replaces the gradients' per-coordinate scaling.
    The solve runs in float32, in float64 for float64 keys (the factors then are float64 too).
    """
    n, d_in = keys.shape
    c = torch.float64 if keys.dtype == torch.float64 else torch.float32
    v = step_values(keys, grads, stats, lr=lr, hold=hold, whitener=whitener)
    k1, v1 = keys, v
    if protect_mean > 0:
        mu = stats.mean[:d_in].to(device=keys.device, dtype=c)
        row = (math.sqrt(protect_mean * n) * mu).to(keys.dtype)[None]
        k1 = torch.cat([keys, row], 0)
        v1 = torch.cat([v, v.new_zeros(1, v.shape[1])], 0)
    if prior is not None:
        kd = k1.to(device=prior.factor.device, dtype=torch.float64)
        y = prior.solve(kd.T)
        inner = kd @ y
        inner.diagonal().add_(1.0)
        a = _spd_solve(inner, v1.to(torch.float64), "update with the key memory/preserved keys")
        return Update("dual", a.to(c), y.T.to(keys.dtype).contiguous())
    if choose_method(k1.shape[0], d_in) == "dual":
        return Update("dual", _spd_solve(gram(k1, ridge, True), v1, "update (dual)"), k1)
    return Update("primal", _spd_solve(gram(k1, ridge, False), k1.to(c).T @ v1,
                                       "update (primal)"), keys)


def check_updates(updates: Dict[str, Update], lr: float, ridge: float,
                  official: bool = False) -> None:
    """Refuse a step whose update is not finite in some module (FloatingPointError naming it);
    warn when it is exactly zero in every module. One host synchronization per device."""
    by_device: Dict[torch.device, list] = {}
    for name, u in updates.items():
        by_device.setdefault(u.tensor.device, []).append(name)
    zero = True
    for names in by_device.values():
        ts = [updates[n].tensor for n in names]
        flags = torch.stack([torch.isfinite(t).all() for t in ts]
                            + [(t != 0).any() for t in ts]).cpu()
        if not bool(flags[:len(ts)].all()):
            bad = names[int((~flags[:len(ts)]).nonzero()[0])]
            hint = " (compat='official' statistics are NaN after a one-row block)" if official else ""
            raise FloatingPointError(f"module {bad!r}: the parameter shift is not finite{hint}; "
                                     f"nothing was changed")
        zero = zero and not bool(flags[len(ts):].any())
    if zero and updates:
        warnings.warn(f"the update is exactly zero in every module (lr={lr:g}, ridge={ridge:g}): "
                      f"this step leaves the weights as they were", stacklevel=4)


def first_non_finite(tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first tensor holding NaN/Inf, or None: one reduction per tensor and one
    host synchronization per device for all of them."""
    by_device: Dict[torch.device, list] = {}
    for name, t in tensors.items():
        by_device.setdefault(t.device, []).append(name)
    for names in by_device.values():
        flags = torch.stack([torch.isfinite(tensors[n]).all() for n in names]).cpu()
        if not bool(flags.all()):
            return names[int((~flags).nonzero()[0])]
    return None

"""Whitened value gradients: pseudo-values normalized by the gradients' full running covariance.

The paper divides each output-gradient coordinate by its running standard deviation,
``ĝ = (g - m_g) / (s_g + ε)``. With ``EditConfig.whiten = ε_w > 0`` the gradients are instead
whitened with the running covariance of all rows seen so far under the same statistics key
(StableEdit's full whitening)::

    Σ_g = Cov(g) + ε_w · (tr Cov(g) / d_out) · I
    ĝ   = (g - m_g) Σ_g^{-1/2}            (the symmetric inverse square root)
    V   = -lr ||k̂||² ĝ                     (k̂ = (k - m_k) / (s_k + ε), as in the paper)

``E||ĝ||² ≈ d_out`` either way, so ``lr`` keeps its meaning. Why it helps locality: the
directions that every edit's gradient shares are scaled down to unit variance, and a shift along
a shared direction adds up over the edits (about linearly in their number) where independent
directions add up as a square root.

State: one :class:`GradientCovariance` per statistics key (rows, ``Σ g``, ``Σ g gᵀ``; float64,
``d_out²`` values: 2.6 MB at ``d_out = 576``, 134 MB at 4096), updated with each step's rows
before solving, as the statistics are. Cost per step and statistics key: one ``eigh`` of
``d_out x d_out`` and one ``N x d_out x d_out`` product per module.

Equivalent PyTorch (float64 statistics)::

    m = s1 / n; C = s2 / n - torch.outer(m, m); C.diagonal().add_(eps_w * C.diagonal().mean())
    lam, Q = torch.linalg.eigh(C); W = (Q * lam.rsqrt()) @ Q.T
    k_hat = (k - mean[:d_in]) / (std[:d_in] + EPS)
    V = -lr * k_hat.pow(2).sum(1, keepdim=True) * ((g.double() - m) @ W).to(g.dtype)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable

import torch

__all__ = ["GradientCovariance", "Whitener", "whitened_pseudo_values", "add_gradients",
           "step_whiteners"]


@dataclass
class Whitener:
    """``mean`` (d,) and the symmetric ``inv_sqrt`` = ``Σ_g^{-1/2}`` (d x d), float64."""

    mean: torch.Tensor
    inv_sqrt: torch.Tensor

    def apply(self, grads: torch.Tensor) -> torch.Tensor:
        """``(g - m) Σ^{-1/2}`` computed in float64 on ``grads``' device, returned in its dtype."""
        mean, inv_sqrt = self.mean.to(grads.device), self.inv_sqrt.to(grads.device)
        return ((grads.double() - mean) @ inv_sqrt).to(grads.dtype)


class GradientCovariance:
    """Running ``count``, ``sum`` (d) and ``outer`` = ``Σ g gᵀ`` (d x d) of output gradients,
    float64; :meth:`whitener` turns them into ``Σ_g^{-1/2}`` (see the module docstring)."""

    def __init__(self, dim: int, device=None):
        if isinstance(dim, bool) or int(dim) != dim or dim < 1:
            raise ValueError(f"GradientCovariance dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        return self.outer.device

    def add(self, grads: torch.Tensor) -> "GradientCovariance":
        """Add the rows of ``grads`` (n x d) in place."""
        if grads.dim() != 2 or grads.shape[1] != self.dim:
            raise ValueError(f"gradients must be n x {self.dim}, got {tuple(grads.shape)}")
        g = grads.detach().to(device=self.device, dtype=torch.float64)
        self.count += g.shape[0]
        self.sum += g.sum(0)
        self.outer += g.T @ g
        return self

    def whitener(self, eps: float) -> Whitener:
        """``Σ_g^{-1/2}`` with the ridge ``eps · tr(Σ_g) / d`` (float64). Without spread (no
        rows, or all rows equal) ``g - m`` is zero and the identity is returned."""
        n = float(self.count)
        mean = self.sum / max(n, 1.0)
        cov = self.outer / max(n, 1.0) - torch.outer(mean, mean)
        floor = eps * float(cov.diagonal().mean())
        if not floor > 0:   # zero spread (or non-finite values: refused later as a NaN update)
            return Whitener(mean, torch.eye(self.dim, dtype=torch.float64, device=self.device))
        cov.diagonal().add_(floor)
        evals, evecs = torch.linalg.eigh(cov)
        # Σ + floor·I has every eigenvalue >= floor; the clamp only removes rounding below it
        return Whitener(mean, (evecs * evals.clamp_min(floor).rsqrt()) @ evecs.T)

    def clone(self) -> "GradientCovariance":
        out = GradientCovariance.__new__(GradientCovariance)
        out.dim, out.count = self.dim, self.count.clone()
        out.sum, out.outer = self.sum.clone(), self.outer.clone()
        return out

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"count": self.count, "sum": self.sum, "outer": self.outer}

    def load_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        count, s1, s2 = sd["count"], sd["sum"], sd["outer"]
        if tuple(s1.shape) != (self.dim,) or tuple(s2.shape) != (self.dim, self.dim):
            raise ValueError(f"gradient covariance of shapes {tuple(s1.shape)}, {tuple(s2.shape)} "
                             f"does not fit dim {self.dim}")
        if (count.numel() != 1 or float(count) < 0 or not bool(torch.isfinite(s1).all())
                or not bool(torch.isfinite(s2).all())):
            raise ValueError("gradient covariance holds NaN/Inf values or a negative count")
        put = lambda t: t.to(device=self.device, dtype=torch.float64).clone()  # noqa: E731
        self.count, self.sum, self.outer = put(count).reshape(()), put(s1), put(s2)

    def __repr__(self) -> str:
        return f"GradientCovariance(dim={self.dim}, rows={int(self.count)})"


def whitened_pseudo_values(keys: torch.Tensor, grads: torch.Tensor, stats, whitener: Whitener,
                           lr: float, eps: float) -> torch.Tensor:
    """``V = -lr ||k̂||² (g - m) Σ_g^{-1/2}`` (N x d_out) in float32, or float64 for float64
    keys; ``k̂`` uses the running statistics' key half as the paper's pseudo-values do."""
    c = torch.float64 if keys.dtype == torch.float64 else torch.float32
    d_in = keys.shape[1]
    mean_k = stats.mean[:d_in].to(device=keys.device, dtype=c)
    scale_k = stats.std[:d_in].to(device=keys.device, dtype=c) + eps
    k_hat = (keys.to(c) - mean_k) / scale_k
    return -lr * k_hat.pow(2).sum(1, keepdim=True) * whitener.apply(grads.to(c))


def add_gradients(covariances: Dict[str, GradientCovariance], grads: Dict[str, torch.Tensor],
                  key_of: Callable[[str], str]) -> None:
    """Add each module's gradient rows (``grads``: module -> N x d_out) to the covariance of its
    statistics key ``key_of(module)``, created on first use on the rows' device."""
    for name, g in grads.items():
        key = key_of(name)
        if key not in covariances:
            covariances[key] = GradientCovariance(g.shape[1], g.device)
        covariances[key].add(g)


def step_whiteners(covariances: Dict[str, GradientCovariance], modules: Iterable[str],
                   key_of: Callable[[str], str], eps: float) -> Dict[str, Whitener]:
    """``{module: Whitener}``: one ``Σ_g^{-1/2}`` per statistics key (modules of one key share
    it), computed once per step."""
    by_key: Dict[str, Whitener] = {}
    out = {}
    for name in modules:
        key = key_of(name)
        if key not in by_key:
            by_key[key] = covariances[key].whitener(eps)
        out[name] = by_key[key]
    return out

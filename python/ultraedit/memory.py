"""Key memory: the second moment of the keys of earlier turns, so later turns keep them.

With ``UltraEditor(memory=ν)``, each edited module keeps ``M = Σ_t K_tᵀ K_t`` over the keys its
committed turns were applied with (the last applied step of each turn), and a turn solves

    ΔW = argmin ||K ΔW - V||² + ν Σ_t ||K_t ΔW||² + λ||ΔW||²  =  (KᵀK + νM + λI)⁻¹ KᵀV

i.e. the new update must leave the module's outputs on earlier edits' keys unchanged (the
lifelong preservation term of sequential MEMIT/AlphaEdit-style editors; the paper's UltraEdit
has ν = 0 and keeps no such state). Cost: one d_in x d_in float64 matrix per edited module, one
d_in x d_in Cholesky of ``νM + λI`` per module and turn, and per step the Woodbury form
``ΔW = Y (I + KY)⁻¹ V`` with ``Y = (νM + λI)⁻¹Kᵀ`` (N right-hand sides and an N x N system,
applied as a rank-N update like the dual path).

Equivalent PyTorch::

    M = sum(K_t.double().T @ K_t.double() for K_t in earlier_turns_keys)
    dW = torch.linalg.solve(K.T @ K + nu * M + ridge * torch.eye(d_in), K.T @ V)

``KeyMemory`` objects live in ``UltraEditor.stats`` under ``"memory:<module name>"``, so they
are committed, rolled back, saved and loaded together with the normalizer statistics.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

__all__ = ["KeyMemory", "MEMORY_PREFIX", "memory_key"]

MEMORY_PREFIX = "memory:"


def memory_key(module_name: str) -> str:
    """The ``UltraEditor.stats`` key of a module's key memory."""
    return MEMORY_PREFIX + module_name


class KeyMemory:
    """``gram = Σ kkᵀ`` (d x d, float64) and ``count`` (rows) of the keys of committed turns."""

    def __init__(self, dim: int, device=None):
        if int(dim) != dim or dim < 1:
            raise ValueError(f"KeyMemory dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        return self.gram.device

    def add(self, keys: torch.Tensor) -> "KeyMemory":
        """Add the rows of ``keys`` (n x d) in place."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be n x {self.dim}, got {tuple(keys.shape)}")
        k = keys.detach().to(device=self.device, dtype=torch.float64)
        self.gram.addmm_(k.T, k)
        self.count += k.shape[0]
        return self

    def clone(self) -> "KeyMemory":
        out = KeyMemory.__new__(KeyMemory)
        out.dim, out.gram, out.count = self.dim, self.gram.clone(), self.count.clone()
        return out

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"gram": self.gram, "count": self.count}

    def load_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        gram = sd["gram"]
        if tuple(gram.shape) != (self.dim, self.dim):
            raise ValueError(f"key memory of shape {tuple(gram.shape)} does not fit dim {self.dim}")
        self.gram = gram.to(device=self.device, dtype=torch.float64).clone()
        self.count = sd["count"].to(device=self.device, dtype=torch.float64).clone().reshape(())

    def __repr__(self) -> str:
        return f"KeyMemory(dim={self.dim}, rows={int(self.count)})"


def memory_factor(memory: Optional[KeyMemory], nu: float, ridge: float,
                  preserved: Optional[torch.Tensor] = None, mu: float = 0.0) -> torch.Tensor:
    """The lower Cholesky factor of ``νM + μP + λI`` (float64; SPD with eigenvalues ≥ λ).

    ``memory`` may be None (no earlier turn); ``preserved`` is the Gram ``P`` of the preserved
    subject keys of this turn (``ultraedit.preserve``), None for none."""
    terms = [(t, w) for t, w in ((None if memory is None else memory.gram, nu), (preserved, mu))
             if t is not None]
    if not terms:
        raise ValueError("memory_factor needs a key memory or preserved keys")
    system = torch.zeros_like(terms[0][0], dtype=torch.float64)
    for term, weight in terms:
        system.add_(term.to(device=system.device, dtype=torch.float64), alpha=weight)
    system.diagonal().add_(ridge)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise FloatingPointError(f"the key memory's system νM + μP + λI is not positive definite "
                                 f"(info={int(info)}); the memory or the preserved keys hold "
                                 f"non-finite values")
    return factor

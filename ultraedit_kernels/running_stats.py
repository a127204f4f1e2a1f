"""Lifelong running statistics of the features ``z = [k ; g]`` (UltraEdit's normalizer)."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from ._validation import all_finite, check_finite, check_float_matrix
from .stats_update import stats_update_call

COMPAT_MODES = ("fixed", "official")
EPS = float(torch.finfo(torch.float32).eps)  # the paper's eps (float32 machine epsilon)


class RunningStats:
    """Per-column running count, mean and M2 of a stream of row blocks, kept in float64.

    ``update(x)`` merges a block ``x`` of shape (N, dim) with Chan's parallel formula
    (N = 1 works).  ``var`` is the unbiased variance ``M2 / (count - 1)`` and ``std`` its
    square root; both are zero until two rows were seen.

    ``compat="official"`` reproduces the reference implementation of the paper: its M2 adds
    ``B * var_unbiased`` of each block instead of ``(B - 1) * var_unbiased`` (std inflated by
    about 5% at 10 rows per block; a one-row block gives NaN), and its std is
    ``sqrt(M2 / (count - 1 + eps))``.

    Equivalent PyTorch for ``compat="fixed"`` after all updates::

        z = torch.cat(blocks).double(); count = len(z)
        mean = z.mean(0); var = z.var(0, unbiased=True); std = var.sqrt()
    """

    def __init__(self, dim: int, compat: str = "fixed", device: Optional[torch.device] = None):
        if int(dim) != dim or dim <= 0:
            raise ValueError(f"dim must be a positive integer (d_in + d_out), got {dim!r}")
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        self.dim = int(dim)
        self.compat = compat
        device = torch.device(device) if device is not None else None
        self._count = torch.zeros((), dtype=torch.float64, device=device)
        self._mean = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self._m2 = torch.zeros(self.dim, dtype=torch.float64, device=device)

    # ------------------------------------------------------------------ updates
    def update(self, x: torch.Tensor, *, check_finite_values: bool = True) -> "RunningStats":
        """Merge the rows of ``x`` (N x dim, any float dtype) into the statistics.

        The state lives on the device of the first block (moved there if it was created
        elsewhere and is still empty).  Rejected input leaves the statistics unchanged.
        """
        check_float_matrix("x", x)
        if x.shape[1] != self.dim:
            raise ValueError(
                f"x has {x.shape[1]} columns but these statistics track dim={self.dim} "
                f"(d_in + d_out of the module)")
        if x.device != self._mean.device:
            if self.count == 0:
                self.to(x.device)
            else:
                raise ValueError(
                    f"x is on {x.device} but the statistics live on {self._mean.device}")
        count, mean, m2 = stats_update_call(
            x, self._count, self._mean, self._m2, self.compat == "official")
        if check_finite_values:
            self._check_merged(mean, m2, x.shape[0], x=x)
        self._count, self._mean, self._m2 = count, mean, m2
        return self

    def _check_merged(self, mean: torch.Tensor, m2: torch.Tensor, rows: int, **inputs) -> None:
        """Raise (state untouched) if the merged statistics are not finite.

        NaN/Inf anywhere in the block reach its column's mean (and M2), so checking the two
        ``dim``-long results replaces a pass over the block; the block is inspected only to
        word the error.  ``compat="official"`` keeps the reference code's NaN M2 after a one-row
        block (pseudo-values then refuse those statistics).
        """
        official_nan = self.compat == "official" and rows == 1
        if bool(torch.isfinite(mean).all()) and (official_nan or bool(torch.isfinite(m2).all())):
            return
        for name, t in inputs.items():
            check_finite(name, t)
        raise ValueError(f"the statistics overflow with this block (its values are finite but "
                         f"too large for float64 sums of squares); it was not merged")

    def update_pair(self, keys: torch.Tensor, values_grad: torch.Tensor, *,
                    check_finite_values: bool = True) -> "RunningStats":
        """``update(torch.cat([keys, values_grad], 1))`` without building the concatenation."""
        from .stats_update2 import update_stats_pair
        return update_stats_pair(self, keys, values_grad, check_finite_values=check_finite_values)

    # --------------------------------------------------------------- properties
    @property
    def count(self) -> int:
        return int(self._count.item())

    @property
    def count_tensor(self) -> torch.Tensor:
        """The count as a 0-d float64 tensor on the statistics' device (no host sync)."""
        return self._count

    @property
    def device(self) -> torch.device:
        return self._mean.device

    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    @property
    def m2(self) -> torch.Tensor:
        return self._m2

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance (float64); official mode: ``M2 / (count - 1 + eps)``."""
        return self._derived()[0]

    @property
    def std(self) -> torch.Tensor:
        return self._derived()[1]

    def m2_is_finite(self) -> bool:
        """Whether M2 holds no NaN/Inf (False after a one-row block in compat="official")."""
        return self._derived()[2]

    def is_nonempty(self) -> bool:
        """``count > 0``, read once per state (no host sync per call)."""
        return self._derived()[3]

    def _derived(self):
        """``(var, std, m2 finite, count > 0)``, computed once per state: every op of a turn reads the std,
        and recomputing it (five small kernels and a host sync) cost more than the pseudo-values
        of a small module.  Keyed on the state tensors and their version counters, so a new
        state or an in-place change recomputes it."""
        key = tuple((id(t), t._version) for t in (self._count, self._mean, self._m2))
        cached = getattr(self, "_cache", None)
        if (cached is not None and cached[0] == key
                and (cached[1][0]._version, cached[1][1]._version) == cached[2]):
            return cached[1]
        if self.compat == "official":
            var = self._m2 / (self._count - 1 + EPS)
        else:
            denom = (self._count - 1).clamp_min(1.0)
            var = torch.where(self._count > 1, self._m2 / denom, torch.zeros_like(self._m2))
        value = (var, var.sqrt(), bool(torch.isfinite(self._m2).all()), bool(self._count > 0))
        # the versions of var/std themselves: a caller that changes them in place gets new ones
        self._cache = (key, value, (value[0]._version, value[1]._version))
        return value

    # ---------------------------------------------------------------- plumbing
    def to(self, device) -> "RunningStats":
        self._count = self._count.to(device)
        self._mean = self._mean.to(device)
        self._m2 = self._m2.to(device)
        return self

    def clone(self) -> "RunningStats":
        other = RunningStats.__new__(RunningStats)
        other.dim, other.compat = self.dim, self.compat
        other._count, other._mean, other._m2 = self._count.clone(), self._mean.clone(), self._m2.clone()
        return other

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly): count (0-d), mean, m2 (float64)."""
        return {"count": self._count.clone(), "mean": self._mean.clone(), "m2": self._m2.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise KeyError(f"RunningStats state is missing {sorted(missing)}")
        mean, m2 = state["mean"], state["m2"]
        if tuple(mean.shape) != (self.dim,) or tuple(m2.shape) != (self.dim,):
            raise ValueError(
                f"RunningStats state has mean {tuple(mean.shape)} / m2 {tuple(m2.shape)}, "
                f"expected ({self.dim},)")
        for name in ("count", "mean", "m2"):
            if not isinstance(state[name], torch.Tensor) or not (
                    state[name].is_floating_point() or name == "count"):
                raise TypeError(f"RunningStats state: {name} must be a floating-point tensor, got "
                                f"{type(state[name]).__name__}"
                                + (f" of {state[name].dtype}" if isinstance(state[name], torch.Tensor) else ""))
        count = torch.as_tensor(state["count"]).to(torch.float64)
        if count.numel() != 1:
            raise ValueError(f"RunningStats state: count must be one number, got shape "
                             f"{tuple(count.shape)}")
        count = count.reshape(())
        value = float(count)
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise ValueError(f"RunningStats state: count must be a non-negative integer (rows "
                             f"seen), got {value}")
        if not bool(torch.isfinite(mean).all()):
            raise ValueError("RunningStats state: mean holds NaN/Inf")
        m2_64 = m2.to(torch.float64)
        if self.compat == "fixed":
            # (compat="official" keeps the reference code's NaN M2 after a one-row block)
            if not bool(torch.isfinite(m2_64).all()):
                raise ValueError("RunningStats state: m2 holds NaN/Inf")
        if bool((m2_64 < 0).any()):
            raise ValueError(f"RunningStats state: m2 (sums of squared deviations) must be >= 0, "
                             f"got a minimum of {float(m2_64.min())}")
        if value == 0 and (bool((mean != 0).any()) or bool((m2_64 != 0).any())):
            raise ValueError("RunningStats state: count is 0 but mean/m2 are not zero (no rows "
                             "were seen, so there is nothing to average)")
        if value == 1 and self.compat == "fixed" and bool((m2_64 != 0).any()):
            raise ValueError("RunningStats state: count is 1 but m2 is not zero (one row has no "
                             "spread)")
        device = self._mean.device
        self._count = count.to(device).clone()
        self._mean = mean.to(device=device, dtype=torch.float64).clone()
        self._m2 = m2.to(device=device, dtype=torch.float64).clone()

    def __repr__(self) -> str:
        return (f"RunningStats(dim={self.dim}, compat={self.compat!r}, count={self.count}, "
                f"device={self.device})")


class FrozenStats:
    """Normalization statistics given directly as ``mean`` and ``std`` (length d_in + d_out).

    For callers that keep their own normalizer (e.g. another library's running mean/std
    buffers): ``pseudo_values``, ``shift_factors`` and ``param_shift`` accept it wherever they
    accept a :class:`RunningStats`.  ``std`` is used as given (whatever formula produced it);
    both are held in float64 on their device.

    Equivalent PyTorch::

        FrozenStats(mean, std)  ≙  normalize with (z - mean) / (std + eps)
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        for name, t in (("mean", mean), ("std", std)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor")
        mean, std = mean.detach().reshape(-1), std.detach().reshape(-1)
        if mean.numel() != std.numel() or mean.numel() == 0:
            raise ValueError(f"mean ({mean.numel()}) and std ({std.numel()}) must have the same, "
                             f"non-zero length")
        if mean.device != std.device:
            raise ValueError(f"mean is on {mean.device} but std is on {std.device}")
        if not (all_finite(mean) and all_finite(std)):
            raise ValueError("mean and std must be finite")
        if bool((std < 0).any()):   # a negative std would flip the direction of the update
            raise ValueError("std must be non-negative (a standard deviation)")
        self._mean = mean.to(torch.float64)
        self._std = std.to(torch.float64)
        self.dim = mean.numel()

    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    @property
    def std(self) -> torch.Tensor:
        return self._std

    @property
    def device(self) -> torch.device:
        return self._mean.device

    def to(self, device) -> "FrozenStats":
        return FrozenStats(self._mean.to(device), self._std.to(device))

    def __repr__(self) -> str:
        return f"FrozenStats(dim={self.dim}, device={self.device})"

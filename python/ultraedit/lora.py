"""The accumulated edit as a LoRA adapter that PEFT, vLLM and SGLang load.

Every turn's update of a module is low-rank (``ΔW_t = A_tᵀ K_t``, rank ≤ N_t), so the
accumulated ``Δ = Σ_t ΔW_t`` of a module has rank ≤ Σ_t N_t. A LoRA adapter stores
``Δ ≈ B A`` with ``B`` (d_out x r) and ``A`` (r x d_in) in the ``out x in`` orientation of
``nn.Linear`` (GPT-2 ``Conv1D`` keeps its weight as ``in x out``: PEFT's
``fan_in_fan_out=True`` transposes it back).

The factors come from the SVD of ``Δ`` in float64, ``Δ = U diag(s) Vᵀ``:
``B = U_r diag(√s_r)``, ``A = diag(√s_r) V_rᵀ``. With ``rank=None`` ``r`` is the numerical rank
of ``Δ``: the smallest ``r`` whose left-out tail ``sqrt(Σ_{i>r} s_i²)`` is at most ``floor``
(by default float32 rounding of ``Δ`` itself, ``eps32 · ||Δ||_F``, the floor of an editor's
float32 record of ``Δ`` (bfloat16/float16 weights); for a delta read back as ``W - W0`` the
exporter passes the rounding of the edited weight, ``eps(dtype) · ||W||_F``, because such a
delta carries that much rounding noise and no more information), so ``B A`` equals ``Δ`` as
exactly as the edit holds it; with ``rank=r`` the best rank-r approximation
(Eckart-Young) is written. Either way its relative error
``||Δ - B A||_F / ||Δ||_F = sqrt(Σ_{i>r} s_i²) / sqrt(Σ s_i²)`` is reported per module. All modules share one rank (the largest; smaller factors are padded
with zeros, which changes nothing), because servers take one ``r`` per adapter.

Equivalent PyTorch of one module::

    U, s, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    B = (U[:, :r] * s[:r].sqrt()).float();  A = (s[:r].sqrt()[:, None] * Vh[:r]).float()
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch

from .serialization import EXPORT_SUMMARY  # ranks and truncation errors; servers ignore it

__all__ = ["LoraFactors", "lora_factors", "write_peft_adapter", "ADAPTER_CONFIG",
           "ADAPTER_WEIGHTS", "EXPORT_SUMMARY"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_RANK_EPS = float(torch.finfo(torch.float32).eps)


@dataclass
class LoraFactors:
    """``B`` (d_out x r) and ``A`` (r x d_in) with ``B @ A ≈ Δ`` (out x in orientation).

    ``rank``: the columns that carry the delta (before padding); ``full_rank``: the numerical
    rank of ``Δ``; ``rel_error``: ``||Δ - B A||_F / ||Δ||_F`` of the truncation (0 when
    ``rank == full_rank``; float32 rounding of the factors is not included)."""

    B: torch.Tensor
    A: torch.Tensor
    rank: int
    full_rank: int
    rel_error: float

    def padded(self, r: int) -> "LoraFactors":
        """The same product with ``r`` ≥ ``rank`` columns (zero columns of B, zero rows of A)."""
        extra = r - self.B.shape[1]
        if extra <= 0:
            return self
        B = torch.cat([self.B, self.B.new_zeros(self.B.shape[0], extra)], 1)
        A = torch.cat([self.A, self.A.new_zeros(extra, self.A.shape[1])], 0)
        return LoraFactors(B, A, self.rank, self.full_rank, self.rel_error)


def lora_factors(delta: torch.Tensor, rank: Optional[int] = None,
                 floor: Optional[float] = None) -> LoraFactors:
    """Factor one module's accumulated delta ``Δ`` (d_out x d_in) as ``B A``; see the module doc.

    ``rank=None``: the numerical rank, i.e. the tail left out is at most ``floor`` in Frobenius
    norm (default ``eps32 · ||Δ||_F``); ``rank=r``: the best rank-``min(r, full_rank)``
    approximation. Returns float32 factors on ``delta``'s device.
    """
    if delta.dim() != 2:
        raise ValueError(f"lora_factors: the delta must be a matrix, got shape {tuple(delta.shape)}")
    if rank is not None and (int(rank) != rank or rank < 1):
        raise ValueError(f"lora_factors: rank must be a positive integer or None, got {rank!r}")
    d = delta.detach().double()
    if not bool(torch.isfinite(d).all()):
        raise ValueError("lora_factors: the delta holds NaN/Inf values")
    U, s, Vh = torch.linalg.svd(d, full_matrices=False)
    # tail[r] = sqrt(Σ_{i>=r} s_i²): the Frobenius error of keeping the first r singular values
    tail = s.flip(0).square().cumsum(0).flip(0).sqrt()
    tail = torch.cat([tail, tail.new_zeros(1)])
    total = float(tail[0])
    if floor is None:
        floor = _RANK_EPS * total
    full_rank = int((tail > floor).sum()) if total > 0 else 0
    r = full_rank if rank is None else min(int(rank), full_rank)
    rel_error = float(tail[r]) / total if total > 0 else 0.0
    root = s[:r].sqrt()
    B = (U[:, :r] * root).float()
    A = (root[:, None] * Vh[:r]).float()
    return LoraFactors(B, A, r, full_rank, rel_error)


def write_peft_adapter(path, model, deltas: Mapping[str, torch.Tensor],
                       layouts: Mapping[str, str], rank: Optional[int] = None,
                       base_model_name_or_path: Optional[str] = None,
                       weights: Optional[Mapping[str, torch.Tensor]] = None,
                       delta_source: str = "difference") -> Dict[str, object]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for ``deltas`` to ``path``.

    ``deltas``: module name (as ``model.named_modules()`` names it) -> accumulated delta in the
    module's weight layout; ``layouts``: name -> ``"linear"`` (weight d_out x d_in) or
    ``"conv1d"`` (GPT-2, weight d_in x d_out). Tensor names are PEFT's
    (``base_model.model.<module>.lora_A.weight``), ``lora_alpha = r`` so the scaling is 1.
    ``weights``: name -> the edited weight's values, when ``module.weight`` does not hold them
    (an offloaded module's meta weight, ``ultraedit.placement``). ``delta_source``:
    ``"difference"`` (``Δ = W - W0`` read back from the weights: the numerical rank's floor is
    the weight's rounding, ``eps(W.dtype) · ||W||_F``) or ``"record"`` (an accumulated float32
    record of ``Δ``, finer than the weights: the floor is ``eps32 · ||Δ||_F``).
    Returns the summary that is also written to ``ultraedit_export.json`` beside them: the rank,
    and per module its rank, numerical rank and relative truncation error.
    """
    from safetensors.torch import save_file

    if delta_source not in ("difference", "record"):
        raise ValueError(f"delta_source must be 'difference' or 'record', got {delta_source!r}")
    names = list(deltas)
    if not names:
        raise ValueError("write_peft_adapter: there is no edited module to export")
    kinds = {layouts[n] for n in names}
    if len(kinds) != 1:
        raise ValueError("write_peft_adapter: a LoRA adapter has one weight orientation; the "
                         f"edited modules mix {sorted(kinds)}")
    fan_in_fan_out = kinds == {"conv1d"}
    named = dict(model.named_modules())
    factors: Dict[str, LoraFactors] = {}
    for name in names:
        if name not in named:
            raise ValueError(f"write_peft_adapter: module {name!r} is not in this "
                             f"{type(model).__name__}")
        d = deltas[name]
        # a delta read back as W - W0 holds the weight's rounding noise and nothing finer; a
        # float32 record of the updates is finer than the (bf16/fp16) weights it is added to
        floor = None
        if delta_source == "difference":   # the weight is read only where it sets the floor
            weight = named[name].weight if weights is None else weights[name]
            floor = torch.finfo(weight.dtype).eps * float(weight.detach().double().norm())
        factors[name] = lora_factors(d.T if fan_in_fan_out else d, rank, floor=floor)
    r = max(1, max(f.rank for f in factors.values()))
    tensors: Dict[str, torch.Tensor] = {}
    modules: List[Dict[str, object]] = []
    for name, f in factors.items():
        f = f.padded(r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = f.A.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = f.B.contiguous().cpu()
        modules.append({"name": name, "rank": f.rank, "full_rank": f.full_rank,
                        "rel_error": f.rel_error})
    summary = {"rank": r, "exact": all(m["rank"] == m["full_rank"] for m in modules),
               "max_rel_error": max(m["rel_error"] for m in modules), "modules": modules}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": fan_in_fan_out,
        "target_modules": names, "use_rslora": False, "use_dora": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path
        or getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tmp_w = out / f".{ADAPTER_WEIGHTS}.tmp"
    tmp_c = out / f".{ADAPTER_CONFIG}.tmp"
    save_file(tensors, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(config, indent=2) + "\n")
    (out / EXPORT_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp_w, out / ADAPTER_WEIGHTS)
    os.replace(tmp_c, out / ADAPTER_CONFIG)
    return summary

"""Add the rank-N UltraEdit update ``ΔW = Kᵀ A`` to a weight in place.

Formula (``K`` keys N x d_in, ``A`` factors N x d_out)::

    nn.Linear  (weight d_out x d_in):  W += Aᵀ K        (= ΔWᵀ)
    GPT-2 Conv1D (weight d_in x d_out): W += Kᵀ A        (= ΔW)

No dense float32 ΔW is materialized for float32/float64 weights (one in-place ``addmm_``).
bf16/fp16 weights are updated in row blocks: each block is computed in float32 and
rounded once, so the temporary is at most ``_BLOCK_BYTES``.

The weight never receives NaN/Inf: non-finite keys or factors, or a product that would
overflow the weight's dtype, raise ``ValueError`` with the weight unchanged (unless the caller
passes ``check=False``).

Equivalent PyTorch::

    W += (A.T @ K.float()).to(W.dtype)        # Linear
    W += (K.float().T @ A).to(W.dtype)        # Conv1D
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _backends, _extension
from ._validation import check_finite, check_float_matrix, serial, without_grad

OP = "apply_shift"
LAYOUTS = ("linear", "conv1d")
_BLOCK_BYTES = 64 << 20


def apply_shift_reference(weight: torch.Tensor, keys: torch.Tensor, factors: torch.Tensor,
                          linear: bool) -> None:
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    k = keys if keys.dtype == compute else keys.to(compute)
    a = factors if factors.dtype == compute else factors.to(compute)
    left, right = (a.T, k) if linear else (k.T, a)   # W += left @ right
    if weight.dtype == compute:
        # one addmm_, a single row too: an outer product (addr_) measured 1.1-1.3x faster than
        # it on a Zen 4 EPYC but 1.16-1.28x slower on an Intel Xeon (the same torch build, 7B
        # shapes), so the plain call is the one that is never slower
        weight.addmm_(left, right)
        return
    rows_per_block = max(1, _BLOCK_BYTES // (4 * weight.shape[1]))
    for start in range(0, weight.shape[0], rows_per_block):
        block = weight[start:start + rows_per_block]
        update = torch.addmm(block.to(compute), left[start:start + rows_per_block], right)
        block.copy_(update)


def _apply_shift_body(weight, keys, factors, linear):
    _, fn = _backends.select(OP, weight.device, weight, keys, factors)
    fn(weight, keys, factors, linear)


@torch.library.custom_op("ultraedit::apply_shift_", mutates_args=("weight",))
def apply_shift_op(weight: torch.Tensor, keys: torch.Tensor, factors: torch.Tensor,
                   linear: bool) -> None:
    _apply_shift_body(weight, keys, factors, linear)


apply_shift_call = _backends.eager(apply_shift_op, _apply_shift_body)


@apply_shift_op.register_fake
def _(weight, keys, factors, linear):
    return None


_backends.register_impl(OP, "torch", apply_shift_reference)


def layout_of(module: torch.nn.Module) -> str:
    """``"linear"`` for ``nn.Linear``, ``"conv1d"`` for GPT-2 style ``Conv1D``."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    raise TypeError(
        f"can only edit nn.Linear or GPT-2 Conv1D modules, got {type(module).__name__}")


@without_grad
def apply_shift_(weight, keys: torch.Tensor, factors: torch.Tensor,
                 layout: Optional[str] = None, *, check: bool = True) -> None:
    """In place: add ``ΔW = keysᵀ factors`` to ``weight`` (a tensor, or a Linear/Conv1D module).

    ``keys`` (N, d_in), ``factors`` (N, d_out); ``layout`` is ``"linear"`` (weight
    d_out x d_in: ``W += factorsᵀ keys``) or ``"conv1d"`` (weight d_in x d_out:
    ``W += keysᵀ factors``), inferred when a module is passed.  Equivalent PyTorch (linear):
    ``W += (factors.T @ keys.float()).to(W.dtype)`` (a bf16/fp16 weight rounded once).

    ``check=False`` skips the guard that keeps NaN/Inf out of the weight (one read of the keys
    and factors, 1-4% of the product at the 576 x 1536 shapes of the embedded model on a
    2-core CPU, ~0.2% at 7B shapes): the caller vouches for finite inputs whose product cannot
    overflow the weight's dtype, and the call is the plain ``addmm_``.  Shapes, dtypes and
    devices are still checked.
    """
    if type(weight) is torch.nn.Parameter:
        weight = weight.data
    host = _host_add_shift if _host_add_shift is not False else _look_up_host_entry()
    if (host is not None and type(weight) is torch.Tensor and type(keys) is torch.Tensor
            and type(factors) is torch.Tensor and (layout == "linear" or layout == "conv1d")
            and _backend_env() in _HOST_ENTRY_BACKENDS and not torch.compiler.is_compiling()
            and host(weight, keys, factors, layout == "linear", check)):
        return   # the common case, entered natively (_look_up_host_entry); else the checks below
    if isinstance(weight, torch.nn.Module):
        inferred = layout_of(weight)
        if layout is not None and layout != inferred:
            raise ValueError(f"layout={layout!r} contradicts the module type ({inferred})")
        layout, weight = inferred, weight.weight
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} (or pass the module), got {layout!r}")
    if type(weight) is not torch.Tensor and isinstance(weight, torch.nn.Parameter):
        weight = weight.data   # (Parameter's isinstance check is Python code: skipped for tensors)
    check_float_matrix("weight", weight)
    check_float_matrix("keys", keys)
    check_float_matrix("factors", factors)
    (n, d_in), (n_factors, d_out) = keys.shape, factors.shape
    if n != n_factors:
        raise ValueError(f"keys and factors must have the same rows, got {n} and {n_factors}")
    expected = (d_out, d_in) if layout == "linear" else (d_in, d_out)
    if weight.shape != expected:
        raise ValueError(f"{layout} weight has shape {tuple(weight.shape)} but keys/factors imply "
                         f"{expected}")
    if not (weight.device == keys.device == factors.device):
        raise ValueError(f"weight ({weight.device}), keys ({keys.device}) and factors "
                         f"({factors.device}) must be on one device")
    linear = layout == "linear"
    if check and not _update_is_safe(weight, keys, factors):
        # The bound could not rule out an overflow (or an input is not finite): compute the
        # updated weight out of place and write it only if every entry is finite.
        check_finite("keys", keys)
        check_finite("factors", factors)
        updated = weight.clone()
        apply_shift_call(updated, keys, factors, linear)
        if not bool(torch.isfinite(updated).all()):
            raise ValueError(
                f"apply_shift_: the update overflows {weight.dtype} (keys and factors are finite, "
                f"but W + ΔW holds Inf/NaN); the weight was left unchanged")
        weight.copy_(updated)
        return
    apply_shift_call(weight, keys, factors, linear)


# The extension's ``add_shift``: the reference's one ``addmm_`` (and the guard's bound) entered
# natively when every argument is one the code above takes unchanged (CPU float32/float64 of one
# dtype, matching shapes; it returns False, touching nothing, otherwise).  The Python checks and
# dispatch it skips run cold after each product: at 50 x 1536 -> 576 on a 2-core Intel Xeon
# they made ``apply_shift_(check=False)`` 2-4% slower than the bare ``addmm_``.  Not used under
# ``ULTRAEDIT_BACKEND=torch`` (the reference without the extension) or while compiling.
_host_add_shift = False   # not looked up yet; then the extension's add_shift, or None
_backend_env = _backends._backend_env   # ULTRAEDIT_BACKEND's raw value
_HOST_ENTRY_BACKENDS = frozenset((None, "", "auto", "cpp"))


def _look_up_host_entry():
    global _host_add_shift
    module = _extension.extension()
    _host_add_shift = getattr(module, "add_shift", None) if module is not None else None
    return _host_add_shift


# ΔW is bounded by N · max|K| · max|A|; below this fraction of the dtype's largest value the
# sum W + ΔW can only overflow for weights within 0.4% of that value.
_SAFE_FRACTION = 2.0 ** -8


_HOST_DTYPES = (torch.float32, torch.float64)
_host_abs_max = False   # not looked up yet; then the host build's abs_max, or None


def _abs_maxima(keys: torch.Tensor, factors: torch.Tensor):
    """``(max|K|, max|A|)``, NaN where an input holds NaN/Inf."""
    global _host_abs_max
    if keys.device.type == "cpu":
        if _host_abs_max is False:
            module = _extension.extension()
            _host_abs_max = getattr(module, "abs_max", None) if module is not None else None
        if (_host_abs_max is not None and keys.dtype in _HOST_DTYPES
                and factors.dtype in _HOST_DTYPES and keys.is_contiguous()
                and factors.is_contiguous()):
            # one call, one vectorized pass over each (measured 2-3x faster than two aminmax
            # and their four host reads at 50 x 1536 / 50 x 576)
            return _host_abs_max([keys, factors])
        with serial():
            (k_lo, k_hi), (a_lo, a_hi) = torch.aminmax(keys), torch.aminmax(factors)
    else:
        (k_lo, k_hi), (a_lo, a_hi) = torch.aminmax(keys), torch.aminmax(factors)
    # aminmax: one pass, NaN propagates (vector_norm(x, inf) measured 20x slower on the CPU)
    return max(-float(k_lo), float(k_hi)), max(-float(a_lo), float(a_hi))


def _update_is_safe(weight: torch.Tensor, keys: torch.Tensor, factors: torch.Tensor) -> bool:
    """True when keys and factors are finite and ``N · max|K| · max|A|`` cannot overflow the
    weight's dtype: two reductions over the (small) inputs, none over the weight."""
    k_max, a_max = _abs_maxima(keys, factors)
    bound = keys.shape[0] * k_max * a_max
    limit = _LIMITS.get(weight.dtype)
    if limit is None:
        limit = _LIMITS[weight.dtype] = torch.finfo(weight.dtype).max * _SAFE_FRACTION
    return math.isfinite(bound) and bound <= limit


_LIMITS: dict = {}   # weight dtype -> its largest value x _SAFE_FRACTION

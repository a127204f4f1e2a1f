"""Input checks shared by the ops: clear errors that name the argument and the problem."""
from __future__ import annotations

import functools
import math

import torch


def check_float_matrix(name: str, x, *, allow_empty: bool = False) -> None:
    # Two attribute reads (shape, dtype), no tensor method calls: a method goes through torch's
    # argument parser, whose code the product that usually precedes the check has evicted from
    # the caches.  Cold, between 0.8 ms products (50 x 1536 -> 576), checking three tensors
    # with is_floating_point() and dim() cost 0.6% of the product, the attributes 0.3%
    # (measured on the 2-core EPYC; hot, both are ~0.7 µs per tensor).
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    shape = x.shape
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D (rows x features), got shape {tuple(shape)}")
    if shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} has no rows (N = 0): there is nothing to edit")
    if shape[1] == 0:
        raise ValueError(f"{name} has zero columns, shape {tuple(shape)}")


def without_grad(fn):
    """``fn`` run without grad when grad mode is on (a public op's entry point).

    The ops are not differentiable: no autograd formula is registered and the native kernels
    have none, so whichever backend computes a call, its result never requires grad (and a
    grad-requiring input, e.g. an activation still in its graph, never chains that graph into
    the result or into running statistics).
    """
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.is_grad_enabled():
            with torch.no_grad():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return call


class serial:
    """Run the enclosed CPU reductions on one thread (the checks of the public ops).

    A check is one small reduction: on a CPU it is cheap serially, but as a parallel region it
    waits for every OpenMP thread, and on a loaded 2-core machine that wait is a scheduler
    quantum (measured: a 300 x 1536 aminmax, 2 threads 738 µs under load, 1 thread 66 µs;
    switching costs 0.6 µs).  The thread count is process-wide: another Python thread running
    torch ops at the same moment runs them on one thread too (slower, never wrong).
    """

    __slots__ = ("_threads",)

    def __enter__(self):
        self._threads = torch.get_num_threads()
        if self._threads > 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self._threads > 1:
            torch.set_num_threads(self._threads)
        return False


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no NaN/Inf, in one pass without a temporary (syncs on CUDA).

    A sum propagates NaN and Inf, so a finite sum proves every element finite.  The sum runs in
    ``x``'s dtype (float32 for half types, whose sums overflow early); only when it is not finite
    (NaN/Inf present, or finite values whose sum overflowed) does the exact elementwise test run.
    """
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    if x.device.type == "cpu":
        with serial():
            total = x.sum(dtype=dtype)
    else:
        total = x.sum(dtype=dtype)
    if math.isfinite(total.item()):   # one host read; cheaper than an isfinite kernel
        return True
    return bool(torch.isfinite(x).all())


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise if ``x`` holds NaN or Inf (see :func:`all_finite`)."""
    if not all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); refusing to use it")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")
    return first


def check_keys_grads(keys: torch.Tensor, values_grad: torch.Tensor, *, finite: bool = True) -> None:
    """Validate the (keys, values_grad) pair that every UltraEdit op takes."""
    check_float_matrix("keys", keys)
    check_float_matrix("values_grad", values_grad)
    if keys.shape[0] != values_grad.shape[0]:
        raise ValueError(
            f"keys and values_grad must have the same number of rows (one per answer token); "
            f"got {keys.shape[0]} and {values_grad.shape[0]}")
    check_same_device(keys=keys, values_grad=values_grad)
    if finite:
        check_finite("keys", keys)
        check_finite("values_grad", values_grad)


def check_lr(lr: float) -> None:
    """The pseudo-values' step size must be a positive finite number."""
    try:
        value = float(lr)
    except (TypeError, ValueError):
        raise TypeError(f"lr must be a number, got {type(lr).__name__}") from None
    if not (value > 0.0) or value == float("inf"):
        raise ValueError(f"lr must be a positive finite number (the pseudo-values' step size), "
                         f"got {lr}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (the oracle precision end to end), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_ridge(ridge: float) -> None:
    if not (float(ridge) > 0.0) or ridge != ridge or ridge == float("inf"):
        raise ValueError(f"ridge must be a positive finite number (the system's λ), got {ridge}")

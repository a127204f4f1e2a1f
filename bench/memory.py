"""Peak memory of a piece of work, measured from the allocator's point of view (not RSS).

``PeakMemory`` reports the **peak extra bytes**: the highest amount of tensor memory allocated
while the block ran, above what was allocated when it started (inputs, weights and other
long-lived tensors that already exist are not counted; a tensor freed inside the block that was
allocated before it lowers the running total).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` at entry (the caching allocator's live bytes, not its reserved pool).
* CPU: ``torch.profiler.profile(profile_memory=True)`` records every allocation and free made by
  the c10 CPU allocator (every tensor storage, including temporaries inside ATen kernels such as
  the LU copy of ``torch.linalg.solve`` and LAPACK workspaces allocated as tensors). The events
  are sorted by time and summed; the peak of the running total is the answer. Memory that BLAS or
  LAPACK allocate with ``malloc`` outside of torch tensors is not seen (small: packing buffers).

The profiler slows down op-heavy code, so measure memory in a separate run from the timing.

Usage::

    with PeakMemory(device) as pm:
        work()
    pm.peak_bytes, pm.method
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["PeakMemory", "measure_peak", "running_peak"]


def running_peak(deltas: List[Tuple[int, int]]) -> Tuple[int, int]:
    """``(peak, final)`` of the running sum of ``(time, nbytes)`` allocation deltas."""
    total = peak = 0
    for _, nbytes in sorted(deltas, key=lambda item: item[0]):
        total += nbytes
        peak = max(peak, total)
    return peak, total


class PeakMemory:
    """Context manager: peak extra tensor bytes allocated on ``device`` inside the block."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak_bytes: Optional[int] = None
        self.net_bytes: Optional[int] = None   # still allocated at exit minus at entry
        self.method = ""
        self._prof = None
        self._base = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated at entry"
        else:
            from torch.profiler import ProfilerActivity, profile
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                 record_shapes=False, with_stack=False)
            self._prof.__enter__()
            self.method = "torch.profiler profile_memory: running sum of CPU allocator events"
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
            self.net_bytes = int(torch.cuda.memory_allocated(self.device) - self._base)
            return False
        self._prof.__exit__(exc_type, exc, tb)
        if exc_type is not None:
            return False
        deltas = []
        for event in self._prof.profiler.kineto_results.events():
            if event.name() != "[memory]":
                continue
            if event.device_type() != torch.autograd.DeviceType.CPU:
                continue
            deltas.append((event.start_ns(), int(event.nbytes())))
        self.peak_bytes, self.net_bytes = running_peak(deltas)
        self._prof = None
        return False

    def phase_peak(self) -> Optional[int]:
        """CUDA, inside the block: the peak extra bytes since entry or the last call, then a
        reset, so that the next phase's peak is its own (the block's own ``peak_bytes`` then
        covers only the last phase); ``None`` elsewhere."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        peak = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak


def measure_peak(fn: Callable[[], object], device="cpu") -> Tuple[int, str]:
    """Run ``fn()`` once and return ``(peak extra bytes, method)``; the result is dropped."""
    with PeakMemory(device) as pm:
        out = fn()
        del out
    return pm.peak_bytes, pm.method

"""The paper's computation path (the official UltraEdit code's ``cache`` + ``predict_param_shifts``),
kept only as the speed/memory baseline of the benchmarks.

Written from the description of the reference implementation (docs/concepts.md, "The reference
code's quirks"; no code copied). Each step names what it mirrors. It reproduces the reference code's *computation* and its
costs (disk round trip, d_in x d_in LU solve, dense fp32 ΔW, weight gradients), including its
quirks that affect the numbers:

* M2 accumulated with ``B * x.var(0)`` (not ``(B - 1) * ...``), std ``sqrt(M2 / (n - 1 + eps))``,
  state kept in float32 like the reference's buffers;
* normalization run on chunks of ``chunk_rows`` rows padded with zero rows (the padding is
  normalized too, then dropped);
* ``torch.linalg.solve`` (LU) of the primal ``d_in x d_in`` system in float32;
* a dense float32 ΔW, added as ``W += ΔW.T.to(W.dtype)``;
* in the per-turn path, the edited weights require grad, so backward computes (and keeps
  accumulating) their ``.grad``.

Not reproduced: the floor-division bug of the last micro-batch's file index (it only matters when
``n_edits % micro_batch != 0``; the benchmarks use divisible sizes, where it loads the same files).

Public pieces::

    norm = RunningMeanStd(d_in + d_out)
    cache = FeatureCache(tmpdir)
    cache_microbatch(cache, module_idx, mb_idx, keys, values_grad, norm)   # per micro-batch
    dW = predict_param_shift(cache, module_idx, n_mb, norm, lr, lam)       # (d_in, d_out) fp32
    apply_param_shift(weight, dW, layout="linear")
    module_update(weight, micro_batches, norm, cache, ...)                  # all of the above
    PaperTurn(model, modules, ...).turn(batches)                            # forward/backward too
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import torch

EPS32 = float(torch.finfo(torch.float32).eps)


# ----------------------------------------------------------------------------- normalizer
class RunningMeanStd:
    """Mirrors MALMEN's ``RunningMeanStd`` used by UltraEdit (one per weight shape).

    Buffers ``n`` (1,), ``mean``, ``var`` (holds M2, despite its name), ``std`` — float32.
    ``update(x)``: ``n' = n + B``; ``delta = mean(x) - mean``; ``mean += B * delta / n'``;
    ``var += B * x.var(0) + n * B * delta² / n'`` (the ``B * var_unbiased`` quirk);
    ``std = sqrt(var / (n' - 1 + eps))``.  ``forward(x) = (x - mean) / (std + eps)``.
    """

    def __init__(self, size: int, device=None, dtype=torch.float32):
        self.n = torch.zeros(1, device=device, dtype=dtype)
        self.mean = torch.zeros(size, device=device, dtype=dtype)
        self.var = torch.zeros(size, device=device, dtype=dtype)
        self.std = torch.zeros(size, device=device, dtype=dtype)

    def update(self, x: torch.Tensor) -> None:
        rows = x.shape[0]
        n = self.n + rows
        delta = x.mean(0) - self.mean
        self.mean += rows * delta / n
        self.var += rows * x.var(0) + self.n * rows * delta.pow(2) / n
        self.std = (self.var / (n - 1 + EPS32)).sqrt()
        self.n = n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + EPS32)


# ------------------------------------------------------------------------- disk round trip
class FeatureCache:
    """The reference code's cache directory: one ``.pth`` file per (module, micro-batch, kind)."""

    def __init__(self, root: Optional[str] = None):
        self._own = root is None
        self.root = root or tempfile.mkdtemp(prefix="ultraedit-paper-cache-")
        os.makedirs(self.root, exist_ok=True)

    def path(self, module_idx: int, mb_idx: int, kind: str) -> str:
        return os.path.join(self.root, f"{module_idx}_{mb_idx}_{kind}.pth")

    def close(self) -> None:
        if self._own:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class StageTimer:
    """Accumulates wall time per stage name (``perf_counter``); ``None`` disables it."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def _null(_name):
    yield


def cache_microbatch(cache: FeatureCache, module_idx: int, mb_idx: int, keys: torch.Tensor,
                     values_grad: torch.Tensor, normalizer: RunningMeanStd, timer=None) -> None:
    """Mirrors the per-micro-batch, per-module body of the reference ``cache``:
    cast to float32, update the shape's normalizer with ``cat(keys, values_grad)``,
    ``torch.save`` keys and values_grad to their files."""
    t = timer or _null
    keys = keys.to(torch.float32)
    values_grad = values_grad.to(torch.float32)
    with t("stats"):
        normalizer.update(torch.cat((keys, values_grad), -1))
    with t("disk"):
        torch.save(keys, cache.path(module_idx, mb_idx, "keys"))
        torch.save(values_grad, cache.path(module_idx, mb_idx, "values_grad"))


def predict_param_shift(cache: FeatureCache, module_idx: int, n_microbatches: int,
                        normalizer: RunningMeanStd, lr: float = 1e-6, lam: float = 1.0,
                        chunk_rows: int = 128, timer=None) -> torch.Tensor:
    """Mirrors the per-module body of the reference ``predict_param_shifts``; returns the dense
    float32 ΔW (d_in x d_out)."""
    t = timer or _null
    with t("disk"):
        # torch.load every micro-batch's files back and concatenate (one K and one G per module)
        keys = torch.cat([torch.load(cache.path(module_idx, i, "keys"))
                          for i in range(n_microbatches)])
        values_grad = torch.cat([torch.load(cache.path(module_idx, i, "values_grad"))
                                 for i in range(n_microbatches)])
    d_in, d_out = keys.shape[1], values_grad.shape[1]
    with t("pseudo_values"):
        # chunks of `chunk_rows` rows, zero-padded to a full chunk, normalized, padding dropped;
        # coeffs = -lr * ||k̂||²; value_diffs grows by torch.cat per chunk as in the reference
        value_diffs = torch.empty((0, d_out), dtype=torch.float32, device=keys.device)
        for start in range(0, keys.shape[0], chunk_rows):
            z = torch.cat((keys[start:start + chunk_rows], values_grad[start:start + chunk_rows]), -1)
            real = z.shape[0]
            if real < chunk_rows:
                z = torch.cat((z, z.new_zeros(chunk_rows - real, z.shape[1])))
            z_hat = normalizer(z)[:real]
            k_hat, g_hat = z_hat[:, :d_in], z_hat[:, d_in:]
            coeffs = -lr * (k_hat * k_hat).sum(-1).unsqueeze(-1)
            value_diffs = torch.cat((value_diffs, coeffs * g_hat))
    with t("solve"):
        # the primal system with the raw keys: (KᵀK + λI) ΔW = KᵀV, LU in float32
        mat = keys.T @ keys + lam * torch.eye(d_in, dtype=torch.float32, device=keys.device)
        param_shift = torch.linalg.solve(mat, keys.T @ value_diffs)
    return param_shift


def apply_param_shift(weight: torch.Tensor, param_shift: torch.Tensor, layout: str = "linear") -> None:
    """Mirrors the reference update ``W += ΔW.T.to(W.dtype)`` (nn.Linear; Conv1D adds ΔW)."""
    with torch.no_grad():
        delta = param_shift.T if layout == "linear" else param_shift
        weight.data += delta.to(weight.dtype)


def module_update(weight: torch.Tensor, micro_batches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                  normalizer: RunningMeanStd, cache: FeatureCache, module_idx: int = 0,
                  lr: float = 1e-6, lam: float = 1.0, chunk_rows: int = 128,
                  timer=None) -> None:
    """One module's whole turn after capture: cache every micro-batch (stats + save), load,
    normalize, solve, dense apply."""
    for mb_idx, (keys, values_grad) in enumerate(micro_batches):
        cache_microbatch(cache, module_idx, mb_idx, keys, values_grad, normalizer, timer)
    shift = predict_param_shift(cache, module_idx, len(micro_batches), normalizer, lr, lam,
                                chunk_rows, timer)
    with (timer or _null)("apply"):
        apply_param_shift(weight, shift)


# ------------------------------------------------------------------------------ whole turn
class _Tracer:
    """Mirrors the reference ``TracerDict``: a forward hook keeps the module input at the answer
    positions (keys), a full backward hook keeps the output gradient there (values_grad)."""

    def __init__(self, module: torch.nn.Module, mask_ref: List[torch.Tensor]):
        self.keys = self.values_grad = None
        self._mask_ref = mask_ref
        self._handles = [module.register_forward_hook(self._fwd),
                         module.register_full_backward_hook(self._bwd)]

    def _fwd(self, module, inputs, output):
        self.keys = inputs[0][self._mask_ref[0]].detach()

    def _bwd(self, module, grad_inputs, grad_outputs):
        self.values_grad = grad_outputs[0][self._mask_ref[0]].detach()

    def remove(self):
        for h in self._handles:
            h.remove()


class PaperTurn:
    """The reference code's whole turn on a Hugging Face causal LM (Linear modules).

    ``turn(batches)``: for each micro-batch (a dict of input_ids, attention_mask, labels with
    ``-100`` off the answer positions, labels already aligned to the logits), forward, mean
    cross-entropy over answer tokens, backward **with the edited weights requiring grad** (their
    ``.grad`` accumulates and is never cleared, as in the reference), trace keys and gradients,
    ``cache`` them (normalizer update + torch.save); then for every module ``predict`` and apply.
    One normalizer per weight shape. Other parameters are frozen (``requires_grad=False``).
    """

    def __init__(self, model: torch.nn.Module, module_names: Sequence[str], lr: float = 1e-6,
                 lam: float = 1.0, chunk_rows: int = 128, cache_dir: Optional[str] = None):
        self.model = model
        self.module_names = list(module_names)
        self.modules = [model.get_submodule(n) for n in self.module_names]
        self.lr, self.lam, self.chunk_rows = lr, lam, chunk_rows
        self.cache_dir = cache_dir
        self.normalizers: Dict[Tuple[int, int], RunningMeanStd] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        for m in self.modules:
            m.weight.requires_grad_(True)
            shape = (m.in_features, m.out_features)
            if shape not in self.normalizers:
                self.normalizers[shape] = RunningMeanStd(sum(shape), device=m.weight.device)

    def turn(self, batches: Sequence[Dict[str, torch.Tensor]], timer=None) -> None:
        t = timer or _null
        mask_ref: List[torch.Tensor] = [None]
        with FeatureCache(self.cache_dir) as cache:
            for mb_idx, batch in enumerate(batches):
                tracers = [_Tracer(m, mask_ref) for m in self.modules]
                try:
                    labels = batch["labels"]
                    mask_ref[0] = labels != -100
                    with t("forward_backward"), warnings.catch_warnings():
                        # the hooked modules' inputs need no grad (earlier layers are frozen):
                        # torch warns that the full backward hook sees output gradients only
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        logits = self.model(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"]).logits
                        loss = torch.nn.functional.cross_entropy(
                            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
                        loss.backward()
                finally:
                    for tr in tracers:
                        tr.remove()
                for idx, (m, tr) in enumerate(zip(self.modules, tracers)):
                    norm = self.normalizers[(m.in_features, m.out_features)]
                    cache_microbatch(cache, idx, mb_idx, tr.keys.flatten(0, -2),
                                     tr.values_grad.flatten(0, -2), norm, timer)
            for idx, m in enumerate(self.modules):
                norm = self.normalizers[(m.in_features, m.out_features)]
                shift = predict_param_shift(cache, idx, len(batches), norm, self.lr, self.lam,
                                            self.chunk_rows, timer)
                with t("apply"):
                    apply_param_shift(m.weight, shift)

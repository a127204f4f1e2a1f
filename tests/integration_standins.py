"""Stand-ins for the two UltraEdit codebases that ``ultraedit.integrations`` patches.

Written from the description of their interfaces (not copied): the official implementation
(XiaojieGu/UltraEdit: ``editor/ultraedit.py``, ``editor/base.py``, ``util.py``, ``nets.py``) and
EasyEdit's port (``easyeditor/trainer/algs/ULTRAEDIT.py``).  Each attribute says where it comes
from.  Configs are ``SimpleNamespace`` trees here; the official code uses omegaconf
``DictConfig`` (same attribute access), EasyEdit a hyper-parameter object.

Used by tests/test_integrations.py and bench/bench_integrations.py.
"""
from __future__ import annotations

import os
from collections import Counter
from types import SimpleNamespace
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS32 = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------- shared helpers (util.py)
def get_module(model: nn.Module, name: str) -> nn.Module:
    """util.get_module: the submodule at a dotted path."""
    return model.get_submodule(name)


def get_shape(module: nn.Module):
    """util.get_shape: nn.Linear -> (in_features, out_features); GPT-2 Conv1D -> weight.shape."""
    if isinstance(module, nn.Linear):
        return (module.in_features, module.out_features)
    return tuple(module.weight.shape)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """util.cross_entropy for causal LMs: mean CE over the answer positions (labels != -100).
    Labels are already aligned (position t predicts token t+1), so no shift here."""
    ans = torch.where(labels != -100)
    return F.cross_entropy(logits[ans], labels[ans])


class _Tracer:
    """util.Tracer: a forward hook keeps the module input at the answer positions ("keys"); a
    hook on the output tensor keeps the gradient of the loss w.r.t. the output there."""

    def __init__(self, module: nn.Module, mask: torch.Tensor):
        index = torch.where(mask)
        self.keys = None
        self.values_grad = None

        def forward_hook(mod, inputs, output):
            self.keys = inputs[0][index].detach()

            def grad_hook(grad):
                self.values_grad = grad[index].detach()
            if output.requires_grad:
                output.register_hook(grad_hook)

        self.handle = module.register_forward_hook(forward_hook)


class TracerDict(dict):
    """util.TracerDict: module name -> tracer, answer positions = labels != -100; a context
    manager that removes its hooks on exit."""

    def __init__(self, model: nn.Module, config, tuples: Dict[str, torch.Tensor]):
        super().__init__()
        mask = tuples["labels"] != -100
        names = getattr(getattr(config, "model", None), "edit_modules", None)
        if names is None:
            names = config.inner_params          # EasyEdit's config
        for name in names:
            self[name] = _Tracer(get_module(model, name), mask)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for tracer in self.values():
            tracer.handle.remove()


def pad_tensor(tensor: torch.Tensor, target_length: int, dim: int = 0) -> torch.Tensor:
    """editor/ultraedit.py pad_tensor: zero-pad (or narrow) to target_length rows."""
    length = tensor.size(dim)
    if length >= target_length:
        return tensor.narrow(dim, 0, target_length)
    shape = list(tensor.shape)
    shape[dim] = target_length - length
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


# --------------------------------------------------------------------------- nets.py
class RunningMeanStd(nn.Module):
    """MALMEN's RunningMeanStd (nets.py), as both codebases use it: buffers n [1], mean, var
    (the accumulated M2), std; M2 adds ``B * unbiased var`` (the known quirk)."""

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("n", torch.zeros(1))
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.zeros(size))
        self.register_buffer("std", torch.zeros(size))

    def update(self, x: torch.Tensor) -> None:
        n = self.n + x.shape[0]
        delta = x.mean(0) - self.mean
        self.mean += x.shape[0] * delta / n
        self.var += x.shape[0] * x.var(0) + self.n * x.shape[0] * delta.pow(2) / n
        self.std = (self.var / (n - 1 + EPS32)).sqrt()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + EPS32)


# ------------------------------------------------------------------- official (editor/)
class OfficialUltraEdit:
    """editor/ultraedit.py ULTRAEDIT(BaseEditor), current version: ``cache(tuples, net_id)`` and
    ``predict_param_shifts(net_id)``; ``lifelong_normalizer`` is a dict net_id -> ModuleDict
    (one per ``config.editor.iters``).

    config (omegaconf in the original): model.edit_modules, model.name, dataset.name,
    dataset.n_edits, dataset.batch_size (micro-batch size), editor.name, editor.lr,
    editor.batch_size (chunk size of the normalization), editor.cache_dir, editor.iters,
    editor_device, num_seq.
    """

    def __init__(self, config, model: nn.Module):
        # BaseEditor.__init__: shape counter over the edited modules
        self.config = config
        self.model = model
        self.shape_counter = Counter()
        self.name2idx = {}
        for name in config.model.edit_modules:
            shape = get_shape(get_module(model, name))
            self.name2idx[name] = self.shape_counter[shape]
            self.shape_counter[shape] += 1
        self.lifelong_normalizer = self._make_normalizers()

    def _make_normalizers(self):
        return {i: nn.ModuleDict({str(k): RunningMeanStd(k[0] + k[1]) for k in self.shape_counter})
                .to(self.config.editor_device) for i in range(self.config.editor.iters)}

    def _normalizer(self, shape, net_id):
        return self.lifelong_normalizer[net_id][str(shape)]

    def _dir(self) -> str:
        c = self.config
        return (f"{c.editor.cache_dir}/{c.model.name}_{c.dataset.name}_{c.editor.name}_"
                f"{c.dataset.n_edits}_{c.num_seq}")

    def cache(self, tuples: List[Dict[str, torch.Tensor]], net_id):
        for idx, t in enumerate(tuples):
            with TracerDict(self.model, self.config, t) as tr:
                logits = self.model(**t)["logits"]
                cross_entropy(logits, t["labels"]).backward()
            for module_idx, name in enumerate(self.config.model.edit_modules):
                shape = get_shape(get_module(self.model, name))
                keys = tr[name].keys.to(torch.float32).to(self.config.editor_device)
                values_grad = tr[name].values_grad.to(torch.float32).to(self.config.editor_device)
                self._normalizer(shape, net_id).update(torch.cat((keys, values_grad), -1))
                dir_path = self._dir()
                os.makedirs(dir_path, exist_ok=True)
                torch.save(keys, f"{dir_path}/{module_idx}_{idx}_keys.pth")
                torch.save(values_grad, f"{dir_path}/{module_idx}_{idx}_values_grad.pth")

    def predict_param_shifts(self, net_id) -> Dict[str, torch.Tensor]:
        c = self.config
        shifts = {}
        for module_idx, name in enumerate(c.model.edit_modules):
            shape = get_shape(get_module(self.model, name))
            normalizer = self._normalizer(shape, net_id)
            # keys: ceil(n / bs) micro-batches; gradients: ceil(n // bs) (the floor quirk)
            keys = torch.cat([torch.load(f"{self._dir()}/{module_idx}_{idx}_keys.pth")
                              for idx in range(-(-c.dataset.n_edits // c.dataset.batch_size))])
            values_grad = torch.cat([
                torch.load(f"{self._dir()}/{module_idx}_{idx}_values_grad.pth")
                for idx in range(c.dataset.n_edits // c.dataset.batch_size)])
            chunk = c.editor.batch_size
            v = torch.empty((0, shape[1]), device=c.editor_device)
            for start in range(0, keys.shape[0], chunk):
                k_once = pad_tensor(keys[start:start + chunk], chunk)
                g_once = pad_tensor(values_grad[start:start + chunk], chunk)
                with torch.no_grad():
                    z = normalizer(torch.cat((k_once, g_once), -1))
                    k_hat, g_hat = z.split([shape[0], shape[1]], -1)
                    coeffs = -c.editor.lr * (k_hat * k_hat).sum(-1).unsqueeze(-1)
                v = torch.cat((v, coeffs * g_hat))
            with torch.no_grad():
                mat = keys.T @ keys + torch.eye(shape[0], device=c.editor_device)
            v = v[:keys.shape[0]]
            shifts[name] = torch.linalg.solve(mat, keys.T @ v).to(next(self.model.parameters()).device)
        return shifts

    def edit_model(self, param_shifts: Dict[str, torch.Tensor], is_reverse: bool):
        # BaseEditor.edit_model: W += ΔWᵀ for nn.Linear
        for name, shift in param_shifts.items():
            module = get_module(self.model, name)
            if isinstance(module, nn.Linear):
                shift = shift.T
            if is_reverse:
                shift = -shift
            module.weight.data += shift.to(module.weight.data.dtype)


class OfficialUltraEditNoNet(OfficialUltraEdit):
    """The single-normalizer variant of the official editor (as the brief describes it):
    ``cache(tuples)``, ``predict_param_shifts()`` and ``lifelong_normalizer`` a ModuleDict keyed
    by str(shape)."""

    def _make_normalizers(self):
        return nn.ModuleDict({str(k): RunningMeanStd(k[0] + k[1]) for k in self.shape_counter}
                             ).to(self.config.editor_device)

    def _normalizer(self, shape, net_id):
        return self.lifelong_normalizer[str(shape)]

    def cache(self, tuples):
        return super().cache(tuples, None)

    def predict_param_shifts(self):
        return super().predict_param_shifts(None)


def official_config(edit_modules, cache_dir, n_edits, batch_size=4, lr=1e-4, chunk=16, iters=1,
                    device="cpu"):
    return SimpleNamespace(
        model=SimpleNamespace(edit_modules=list(edit_modules), name="tiny"),
        dataset=SimpleNamespace(name="standin", n_edits=n_edits, batch_size=batch_size),
        editor=SimpleNamespace(name="ultraedit", lr=lr, batch_size=chunk, cache_dir=str(cache_dir),
                               iters=iters),
        editor_device=device, num_seq=1)


# --------------------------------------------------------------------------- EasyEdit
class EasyEditUltraEdit(nn.Module):
    """easyeditor/trainer/algs/ULTRAEDIT.py ULTRAEDIT(EditableModel): config.inner_params,
    config.lr, config.editor_batch_size (normalization chunk), config.device; the normalizer is
    a ModuleDict keyed by str(shape); ``cache(batch) -> module_kv_map`` keeps everything in
    memory; ``predict_param_shifts(module_kv_map)``."""

    def __init__(self, model: nn.Module, config):
        super().__init__()
        self.model = model
        self.config = config
        shapes = Counter(get_shape(get_module(model, n)) for n in config.inner_params)
        self.lifelong_normalizer = nn.ModuleDict(
            {str(k): RunningMeanStd(k[0] + k[1]) for k in shapes}).to(config.device)

    def cache(self, batch) -> Dict[int, Dict[int, Dict[str, torch.Tensor]]]:
        module_kv_map = {}
        for idx, t in enumerate(batch):
            with TracerDict(self.model, self.config, t) as tr:
                logits = self.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"])["logits"]
                cross_entropy(logits, t["labels"]).backward()
            for module_idx, name in enumerate(self.config.inner_params):
                shape = get_shape(get_module(self.model, name))
                keys = tr[name].keys.to(torch.float32).to(self.config.device)
                values_grad = tr[name].values_grad.to(torch.float32).to(self.config.device)
                self.lifelong_normalizer[str(shape)].update(torch.cat((keys, values_grad), -1))
                module_kv_map.setdefault(module_idx, {}).update(
                    {idx: {"keys": keys, "values_grad": values_grad}})
        return module_kv_map

    def predict_param_shifts(self, module_kv_map) -> Dict[str, torch.Tensor]:
        shifts = {}
        chunk = self.config.editor_batch_size
        for module_idx, name in enumerate(self.config.inner_params):
            shape = get_shape(get_module(self.model, name))
            normalizer = self.lifelong_normalizer[str(shape)]
            entries = module_kv_map[module_idx]
            keys = torch.cat([entries[i]["keys"] for i in range(len(entries))])
            values_grad = torch.cat([entries[i]["values_grad"] for i in range(len(entries))])
            v = torch.empty((0, shape[1]), device=self.config.device)
            for start in range(0, keys.shape[0], chunk):
                k_once = pad_tensor(keys[start:start + chunk], chunk)
                g_once = pad_tensor(values_grad[start:start + chunk], chunk)
                with torch.no_grad():
                    z = normalizer(torch.cat((k_once, g_once), -1))
                    k_hat, g_hat = z.split([shape[0], shape[1]], -1)
                    coeffs = -self.config.lr * (k_hat * k_hat).sum(-1).unsqueeze(-1)
                v = torch.cat((v, coeffs * g_hat))
            with torch.no_grad():
                mat = keys.T @ keys + torch.eye(shape[0], device=self.config.device)
            v = v[:keys.shape[0]]
            shifts[name] = torch.linalg.solve(mat, keys.T @ v).to(next(self.model.parameters()).device)
        return shifts

    def edit_model(self, param_shifts, is_reverse: bool):
        for name, shift in param_shifts.items():
            module = get_module(self.model, name)
            if isinstance(module, nn.Linear):
                shift = shift.T
            if is_reverse:
                shift = -shift
            module.weight.data += shift.to(module.weight.data.dtype)


def easyedit_config(inner_params, lr=1e-4, chunk=16, device="cpu"):
    return SimpleNamespace(inner_params=list(inner_params), lr=lr, editor_batch_size=chunk,
                           device=device, editor_device=device)


# ------------------------------------------------------------------------------- inputs
def fp64_shift(keys, values_grad, normalizer, lr, ridge=1.0):
    """The originals' formula evaluated in float64 from the same keys, gradients and the
    normalizer's buffers (the test oracle)."""
    k, g = keys.double(), values_grad.double()
    d_in = k.shape[1]
    z = (torch.cat([k, g], 1) - normalizer.mean.double()) / (normalizer.std.double() + EPS32)
    k_hat, g_hat = z[:, :d_in], z[:, d_in:]
    v = -lr * (k_hat * k_hat).sum(1, keepdim=True) * g_hat
    mat = k.T @ k + ridge * torch.eye(d_in, dtype=torch.float64)
    return torch.linalg.solve(mat, k.T @ v)


def random_tuples(n_edits: int, batch_size: int, vocab_size: int, seed: int = 0,
                  max_prompt: int = 6, max_answer: int = 3):
    """Micro-batches (dicts of input_ids, attention_mask, labels) of random requests: right
    padding, labels[t] = input_ids[t+1] at 1..max_answer answer positions, -100 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    tuples = []
    for start in range(0, n_edits, batch_size):
        rows = min(batch_size, n_edits - start)
        lengths = [(int(torch.randint(2, max_prompt + 1, (1,), generator=g)),
                    int(torch.randint(1, max_answer + 1, (1,), generator=g))) for _ in range(rows)]
        width = max(p + a for p, a in lengths)
        ids = torch.zeros(rows, width, dtype=torch.long)
        mask = torch.zeros(rows, width, dtype=torch.long)
        labels = torch.full((rows, width), -100, dtype=torch.long)
        for r, (p, a) in enumerate(lengths):
            seq = torch.randint(3, vocab_size, (p + a,), generator=g)
            ids[r, :p + a - 1] = seq[:-1]
            mask[r, :p + a - 1] = 1
            labels[r, p - 1:p + a - 1] = seq[p:]
        tuples.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return tuples

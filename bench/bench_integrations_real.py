"""The one-line patch measured on the real editor classes of the other codebases.

Takes the paths of checkouts (their code is imported from there, never copied here):

* ``--official PATH``: XiaojieGu/UltraEdit, ``editor/ultraedit.py`` (class ``ULTRAEDIT``);
* ``--easyedit PATH``: EasyEdit, ``easyeditor/models/ultraedit/ULTRAEDIT.py`` (class
  ``ULTRAEDIT``, ``editor_batch_size`` 1024 as in its hparams).

What runs is each class's own ``predict_param_shifts`` (and, for the official one, its disk round
trip of the features), unpatched and patched with ``apply_ultraedit_kernels``, alternating round
by round on the same features; the relative error of both against a float64 evaluation of the
original formula is reported.  The forward/backward of ``cache`` is not run (it is the same
model computation with and without the patch): the features of one 100-edit turn are generated
(keys ~ N(0.05, 0.7²), output gradients ~ 1e-3) and handed to the editor exactly as its ``cache``
hands them on after the backward — EasyEdit: the ``module_kv_map`` and the normalizer update;
official: the normalizer update and the ``torch.save`` of every micro-batch's keys and gradients
(a stand-in ``cache`` method with the official code's lines after the backward).  The official
constructor is bypassed because it only loads a tokenizer from ``config.model.name_or_path``.

Row counts follow what each codebase captures: the official code keeps the answer tokens
(``token: ans``, about 2.8 per edit: N = 280 for 100 edits), EasyEdit every attended token
(``token: mask``, about 12 per edit: N = 1,200).  Shapes: the embedded model's 7 ``down_proj``
(1536 -> 576) and a 7B model's ``up_proj`` (4096 -> 14336, ``--modules-7b`` of them).

Missing optional imports of those codebases (``wandb``, ``omegaconf``, ``nltk``, ``hydra``) are
replaced by empty stand-in modules; nothing in the measured methods uses them.

    PYTHONPATH=.:python python bench/bench_integrations_real.py --official /path/UltraEdit \\
        --easyedit /path/EasyEdit --json bench/results/integrations_real.json
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time
import types
from types import SimpleNamespace as NS

import torch
import torch.nn as nn

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, _ROOT, os.path.join(_ROOT, "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _common import machine_description, write_results  # noqa: E402
from ultraedit.integrations import apply_ultraedit_kernels  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def _stub_missing(*names):
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            mod = types.ModuleType(name)
            if name == "omegaconf":
                mod.DictConfig = dict
            sys.modules[name] = mod


# ------------------------------------------------------------------------------ loading
def load_easyedit(root):
    """EasyEdit's ULTRAEDIT class without running the package's ``__init__`` files (they import
    every editor of EasyEdit and their dependencies)."""
    _stub_missing("hydra")
    for pkg in ("easyeditor", "easyeditor.trainer", "easyeditor.trainer.algs",
                "easyeditor.trainer.algs.malmen", "easyeditor.util", "easyeditor.models",
                "easyeditor.models.ultraedit"):
        if pkg not in sys.modules:
            mod = types.ModuleType(pkg)
            mod.__path__ = [os.path.join(root, *pkg.split("."))]
            sys.modules[pkg] = mod
    return importlib.import_module("easyeditor.models.ultraedit.ULTRAEDIT").ULTRAEDIT


def load_official(root):
    _stub_missing("wandb", "omegaconf", "nltk")
    sys.path.insert(0, root)
    try:
        cls = importlib.import_module("editor.ultraedit").ULTRAEDIT
        nets = importlib.import_module("nets")
    finally:
        sys.path.remove(root)
    return cls, nets.RunningMeanStd


class Modules(nn.Module):
    """A model holding only the edited Linear modules, under their real names."""

    def __init__(self, names, d_in, d_out):
        super().__init__()
        for name in names:
            parent = self
            parts = name.split(".")
            for part in parts[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(parts[-1], nn.Linear(d_in, d_out, bias=False))


def features(n_modules, micro_batches, rows, d_in, d_out, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_modules):
        out.append([((torch.randn(rows, d_in, generator=gen) * 0.7 + 0.05),
                     (torch.randn(rows, d_out, generator=gen) + 0.1) * 1e-3)
                    for _ in range(micro_batches)])
    return out


def fp64_shift(keys, grads, normalizer, lr):
    """float64 evaluation of the original formula with the editor's normalizer buffers."""
    k, g = keys.double(), grads.double()
    z = (torch.cat([k, g], 1) - normalizer.mean.double()) / (normalizer.std.double() + EPS32)
    k_hat, g_hat = z.split([k.shape[1], g.shape[1]], 1)
    v = -lr * (k_hat * k_hat).sum(1, keepdim=True) * g_hat
    eye = torch.eye(k.shape[1], dtype=torch.float64)
    return torch.linalg.solve(k.T @ k + eye, k.T @ v)


def rel_err(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------ EasyEdit
def easyedit_case(cls, names, d_in, d_out, feats, lr=1e-6):
    def make():
        model = Modules(names, d_in, d_out)
        cfg = NS(model_name="llama", model_class="LlamaForCausalLM", device="cpu", half=False,
                 inner_params=list(names), lr=lr, editor_batch_size=1024, token="mask",
                 exact_match=False)
        editor = cls(model, cfg, lambda: None)
        kv = {}
        for m, name in enumerate(names):
            for idx, (k, g) in enumerate(feats[m]):   # what cache() does after the backward
                shape = (d_in, d_out)
                editor.lifelong_normalizer[str(shape)].update(torch.cat((k, g), -1))
                kv.setdefault(m, {})[idx] = {"keys": k, "values_grad": g}
        return editor, kv

    original, kv = make()
    patched, kv2 = make()
    apply_ultraedit_kernels(patched)
    return {"original": lambda: original.predict_param_shifts(kv),
            "patched": lambda: patched.predict_param_shifts(kv2)}, original, kv


# ------------------------------------------------------------------------------ official
def official_case(cls, running_mean_std, names, d_in, d_out, feats, cache_root, lr=1e-6,
                  micro=10, n_edits=100):
    def make(tag):
        model = Modules(names, d_in, d_out)
        cfg = NS(model=NS(edit_modules=list(names), name="llama", name_or_path="unused"),
                 editor=NS(name="ultraedit", lr=lr, batch_size=128, token="ans",
                           cache_dir=os.path.join(cache_root, tag)),
                 dataset=NS(name="zsre", n_edits=n_edits, batch_size=micro), num_seq=0,
                 editor_device="cpu", model_device="cpu")
        editor = cls.__new__(cls)              # the constructor only adds a tokenizer
        editor.config, editor.model = cfg, model
        editor.shape_counter = {(d_in, d_out): len(names)}
        editor.lifelong_normalizer = nn.ModuleDict({str((d_in, d_out)): running_mean_std(d_in + d_out)})

        def cache(self):
            """The official cache() after its forward/backward: normalizer update and saves."""
            c = self.config
            dir_path = (f"{c.editor.cache_dir}/{c.model.name}_{c.dataset.name}_{c.editor.name}_"
                        f"{c.dataset.n_edits}_{c.num_seq}")
            for idx in range(len(feats[0])):
                for m, name in enumerate(names):
                    k, g = feats[m][idx]
                    self.lifelong_normalizer[str((d_in, d_out))].update(torch.cat((k, g), -1))
                    os.makedirs(dir_path, exist_ok=True)
                    torch.save(k, f"{dir_path}/{m}_{idx}_keys.pth")
                    torch.save(g, f"{dir_path}/{m}_{idx}_values_grad.pth")
        editor.cache = types.MethodType(cache, editor)
        return editor

    original, patched = make("original"), make("patched")
    apply_ultraedit_kernels(patched)

    def turn(editor):
        # each round starts from the same normalizer state, as a turn of a fresh run
        editor.lifelong_normalizer = nn.ModuleDict({str((d_in, d_out)): running_mean_std(d_in + d_out)})
        editor.cache()
        return editor.predict_param_shifts()

    return {"original": lambda: turn(original), "patched": lambda: turn(patched)}, original


def alternate(fns, rounds):
    outs = {name: fn() for name, fn in fns.items()}    # warm-up, kept for the accuracy check
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return outs, times


def report(kind, label, outs, times, reference):
    med = {k: statistics.median(v) for k, v in times.items()}
    errs = {k: max(rel_err(outs[k][n], reference[n]) for n in reference) for k in outs}
    row = {"codebase": kind, "shape": label, "median_s": med, "times_s": times,
           "speedup": med["original"] / med["patched"], "max_rel_err_vs_fp64": errs}
    print(f"{kind:9s} {label:34s} original {med['original']:8.3f} s  patched "
          f"{med['patched']:8.3f} s  {row['speedup']:6.1f}x   error vs float64: original "
          f"{errs['original']:.1e}, patched {errs['patched']:.1e}", flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", help="path of a XiaojieGu/UltraEdit checkout")
    p.add_argument("--easyedit", help="path of an EasyEdit checkout")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--modules-7b", type=int, default=2)
    p.add_argument("--skip-7b", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    shapes = [("embedded 7 x down_proj 1536->576", [f"model.layers.{i}.mlp.down_proj"
                                                    for i in range(22, 29)], 1536, 576)]
    if not a.skip_7b:
        shapes.append((f"7B {a.modules_7b} x up_proj 4096->14336",
                       [f"model.layers.{i}.mlp.up_proj" for i in range(18, 18 + a.modules_7b)],
                       4096, 14336))
    rows = []
    if a.easyedit:
        cls = load_easyedit(a.easyedit)
        for label, names, d_in, d_out in shapes:
            feats = features(len(names), 10, 120, d_in, d_out, seed=1)   # N = 1,200 (mask)
            fns, original, kv = easyedit_case(cls, names, d_in, d_out, feats)
            ref = {}
            for m, name in enumerate(names):
                k = torch.cat([x for x, _ in feats[m]])
                g = torch.cat([y for _, y in feats[m]])
                ref[name] = fp64_shift(k, g, original.lifelong_normalizer[str((d_in, d_out))], 1e-6)
            outs, times = alternate(fns, a.rounds)
            rows.append(report("easyedit", label + ", N=1200", outs, times, ref))
    if a.official:
        cls, rms = load_official(a.official)
        with tempfile.TemporaryDirectory() as tmp:
            for label, names, d_in, d_out in shapes:
                feats = features(len(names), 10, 28, d_in, d_out, seed=2)   # N = 280 (ans)
                fns, original = official_case(cls, rms, names, d_in, d_out, feats, tmp)
                outs, times = alternate(fns, a.rounds)
                norm = original.lifelong_normalizer[str((d_in, d_out))]
                ref = {}
                for m, name in enumerate(names):
                    k = torch.cat([x for x, _ in feats[m]])
                    g = torch.cat([y for _, y in feats[m]])
                    ref[name] = fp64_shift(k, g, norm, 1e-6)
                rows.append(report("official", label + ", N=280", outs, times, ref))
    result = {"machine": machine_description(), "command": " ".join(sys.argv), "rows": rows}
    write_results(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

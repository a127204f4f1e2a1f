"""Saving and loading an editor's lifelong state: safetensors + a JSON manifest, atomically.

A state is a directory::

    manifest.json        format, versions that wrote it, model architecture, configuration,
                         turn count, edited modules (shape, dtype, sha256 of the weights),
                         normalizer keys, and the sha256 + size of every tensor file
    stats.safetensors    per normalizer key: ``<key>.count`` (0-d), ``<key>.mean``, ``<key>.m2``
                         (float64, the exact RunningStats state)
    delta.safetensors    (``include_delta=True``) per module ``base.<name>`` (W0, weight dtype)
                         and ``delta.<name>`` (Δ with ``W = round(W0 + Δ)`` exactly)
    preserve.safetensors (``preserve > 0``) per module ``<name>`` the preserved subject keys
                         (float32, captured from the unedited model); their owners are the
                         manifest's ``preserve_owners``

Everything is written into a temporary sibling directory, flushed, and renamed over ``path``
(``os.replace``), so a crash never leaves a half-written state where a previous one was; an
existing directory is replaced only if it holds one of our manifests. No pickle: tensors go
through safetensors, everything else through JSON.

Loading verifies the checksums, the model's class and ``config.model_type``, every module's
shape and dtype, and that the model's weights are either the base the deltas start from (then
the edited weights are written) or the edited weights themselves; anything else raises
:class:`StateError` before the model or editor is touched.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = ["save_state", "load_state", "StateError", "FORMAT", "FORMAT_VERSION",
           "tensor_sha256", "file_sha256"]

FORMAT = "ultraedit-state"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATS_FILE = "stats.safetensors"
DELTA_FILE = "delta.safetensors"
PRESERVE_FILE = "preserve.safetensors"


class StateError(ValueError):
    """A saved state or delta is corrupt, incomplete, or does not fit the given model."""


# ---------------------------------------------------------------------- small helpers
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (row-major), independent of its device."""
    flat = t.detach().contiguous().reshape(-1).cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("ultraedit_kernels", "transformers", "safetensors"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "unknown")
        except ImportError:
            out[mod] = "missing"
    return out


def model_info(model) -> Dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {"class": type(model).__name__, "model_type": getattr(cfg, "model_type", None),
            "name_or_path": str(getattr(cfg, "_name_or_path", "") or "")}


def check_model(model, info: Dict[str, Any]) -> None:
    got = model_info(model)
    for key in ("class", "model_type"):
        if info.get(key) != got[key]:
            raise StateError(f"the state was written for a {info.get('class')} "
                             f"(model_type={info.get('model_type')!r}), not this {got['class']} "
                             f"(model_type={got['model_type']!r})")


# ---------------------------------------------------------------------- atomic directories
def write_dir(path, files: Dict[str, Dict[str, torch.Tensor]], manifest: Dict[str, Any]) -> None:
    """Write ``files`` (file name -> tensors) and ``manifest.json`` atomically into ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not (path.is_dir() and ((path / MANIFEST).is_file()
                                                  or not any(path.iterdir()))):
        raise StateError(f"{path} exists and is not an ultraedit state directory; refusing to "
                         f"overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=str(path.parent)))
    old = None
    try:
        listing = {}
        for fname, tensors in files.items():
            target = tmp / fname
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(target),
                      metadata={"format": FORMAT})
            _fsync(target)
            listing[fname] = {"sha256": file_sha256(target), "bytes": target.stat().st_size}
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, "written_by": versions(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                **manifest, "files": listing}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(full, f, indent=1, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        if path.exists() and any(path.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=str(path.parent)))
            os.replace(path, old / "state")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old / "state", path)  # put the previous state back
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_dir(path, expect_kind: str) -> Tuple[Dict[str, Any], Dict[str, Dict[str, torch.Tensor]]]:
    """Read and verify a directory written by :func:`write_dir`: manifest, checksums, tensors."""
    from safetensors.torch import load_file

    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise StateError(f"{path} is not an ultraedit {expect_kind} directory (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StateError(f"{mpath} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise StateError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StateError(f"{mpath}: format_version {manifest.get('format_version')!r}; this "
                         f"ultraedit reads version {FORMAT_VERSION}")
    if manifest.get("kind") != expect_kind:
        use = "apply_delta" if manifest.get("kind") == "delta" else "load_state"
        raise StateError(f"{path} holds a {manifest.get('kind')!r}, not a {expect_kind!r} "
                         f"(use {use})")
    tensors = {}
    for fname, meta in manifest.get("files", {}).items():
        fpath = path / fname
        if not fpath.is_file():
            raise StateError(f"{path}: {fname} is missing")
        digest = file_sha256(fpath)
        if digest != meta.get("sha256"):
            raise StateError(f"{path}: checksum mismatch for {fname} (sha256 {digest[:16]}..., "
                             f"manifest {str(meta.get('sha256'))[:16]}...): the file is corrupt "
                             f"or was modified")
        tensors[fname] = load_file(str(fpath))
    return manifest, tensors


# ---------------------------------------------------------------------- save / load
def save_state(editor, path, include_delta: bool = True) -> str:
    """Write the editor's lifelong state to the directory ``path`` (see the module docstring).

    ``include_delta=False`` writes only statistics and configuration: the model must then be
    saved separately (e.g. ``save_pretrained``) and loaded with the state; when accumulating in
    fp32 the sub-rounding part of Δ is then not carried over (the resume is not bit-exact).
    """
    from .memory import KeyMemory

    tracker = editor._delta
    stats_t: Dict[str, torch.Tensor] = {}
    stats_meta = []
    for key, st in editor.stats.items():
        sd = st.state_dict()
        if isinstance(st, KeyMemory):
            for part in ("count", "gram"):
                stats_t[f"{key}.{part}"] = sd[part]
            stats_meta.append({"key": key, "dim": st.dim, "kind": "memory"})
            continue
        for part in ("count", "mean", "m2"):
            stats_t[f"{key}.{part}"] = sd[part]
        stats_meta.append({"key": key, "dim": st.dim, "compat": st.compat})
    files = {STATS_FILE: stats_t}
    modules = []
    for name, module in editor.modules.items():
        w = module.weight
        modules.append({"name": name, "layout": editor._layout[name], "shape": list(w.shape),
                        "dtype": dtype_name(w.dtype), "weight_sha256": tensor_sha256(w),
                        "base_sha256": tensor_sha256(tracker.base[name])})
    if include_delta:
        delta_t = {}
        for name in editor.modules:
            delta_t[f"base.{name}"] = tracker.base[name]
            delta_t[f"delta.{name}"] = tracker.current_delta(name)
        files[DELTA_FILE] = delta_t
    owners = None
    if editor.preserved:
        files[PRESERVE_FILE] = {name: pk.keys for name, pk in editor.preserved.items()}
        owners = next(iter(editor.preserved.values())).owners
    manifest = {
        "kind": "state",
        "model": model_info(editor.model),
        "config": {"lr": editor.lr, "ridge": editor.ridge, "micro_batch": editor.micro_batch,
                   "compat": editor.compat, "normalizer": editor.normalizer,
                   "accumulate": tracker.accumulate, "history": tracker.history,
                   "delta_device": None if tracker.device is None else str(tracker.device),
                   "modules": list(editor.modules),
                   "protect_mean": editor.protect_mean, "steps": editor.steps,
                   "hold_done": editor.hold_done, "positions": editor.positions,
                   "memory": editor.memory, "preserve": editor.preserve},
        "preserve_owners": owners,
        "turns": int(editor.turns), "base_turn": int(tracker.base_turn),
        "include_delta": bool(include_delta),
        "modules": modules, "stats": stats_meta,
    }
    write_dir(path, files, manifest)
    return str(path)


def load_state(cls, path, model, tokenizer, history: Optional[int] = None, delta_device=None,
               verify_weights: bool = True):
    """Build a ``cls`` (UltraEditor) on ``model`` from the state saved at ``path``.

    ``model`` may hold the base weights (when the state includes deltas, the edited weights are
    written into it) or the edited weights (e.g. reloaded with ``from_pretrained``).
    ``history``/``delta_device`` override the saved settings (the history itself is not saved).
    """
    from ultraedit_kernels import RunningStats

    from .memory import KeyMemory, memory_key

    manifest, files = read_dir(path, expect_kind="state")
    required = [STATS_FILE] + ([DELTA_FILE] if manifest.get("include_delta") else [])
    missing = [f for f in required if f not in files]
    if missing or not {"model", "config", "modules", "stats", "turns"} <= set(manifest):
        raise StateError(f"{path}: incomplete state (missing {missing or 'manifest fields'})")
    check_model(model, manifest["model"])
    cfg = manifest["config"]
    named = dict(model.named_modules())
    for entry in manifest["modules"]:
        module = named.get(entry["name"])
        if module is None or getattr(module, "weight", None) is None:
            raise StateError(f"{path}: edited module {entry['name']!r} is not in this "
                             f"{type(model).__name__}")
        w = module.weight
        if list(w.shape) != entry["shape"]:
            raise StateError(f"{path}: module {entry['name']!r} has weight shape {list(w.shape)}, "
                             f"the state was written for {entry['shape']}")
        if dtype_name(w.dtype) != entry["dtype"]:
            raise StateError(f"{path}: module {entry['name']!r} is {dtype_name(w.dtype)}, the "
                             f"state was written for {entry['dtype']} weights")

    # ---- weights: decide what to write, before anything is changed
    writes: Dict[str, torch.Tensor] = {}
    base: Dict[str, torch.Tensor] = {}
    delta: Dict[str, torch.Tensor] = {}
    if manifest.get("include_delta"):
        from .delta import reconstruct

        tensors = files.get(DELTA_FILE, {})
        for entry in manifest["modules"]:
            name = entry["name"]
            b, d = tensors.get(f"base.{name}"), tensors.get(f"delta.{name}")
            if b is None or d is None:
                raise StateError(f"{path}: {DELTA_FILE} lacks the base or delta of {name!r}")
            w = named[name].weight.detach()
            edited = reconstruct(b, d, w.dtype)
            if torch.equal(w.cpu(), b):
                writes[name] = edited
            elif not torch.equal(w.cpu(), edited):
                raise StateError(f"{path}: the weights of {name!r} are neither the base model's "
                                 f"nor the edited ones this state records; load the base model "
                                 f"(or the model saved at turn {manifest['turns']})")
            base[name], delta[name] = b, d
    elif verify_weights:
        for entry in manifest["modules"]:
            if tensor_sha256(named[entry["name"]].weight) != entry["weight_sha256"]:
                raise StateError(
                    f"{path}: module {entry['name']!r} does not hold the weights the state was "
                    f"saved with (sha256 differs) and the state has no deltas to rebuild them: "
                    f"load the edited model saved at turn {manifest['turns']} "
                    f"(or pass verify_weights=False)")

    # ---- statistics
    stats_t = files[STATS_FILE]
    devices = {}
    editor = cls(model, tokenizer, modules=cfg["modules"], lr=cfg["lr"], ridge=cfg["ridge"],
                 micro_batch=cfg["micro_batch"], compat=cfg["compat"],
                 normalizer=cfg["normalizer"], accumulate=cfg["accumulate"],
                 delta_device=cfg.get("delta_device") if delta_device is None else delta_device,
                 history=cfg["history"] if history is None else history,
                 # states saved before these options existed were made without them
                 protect_mean=cfg.get("protect_mean", 0.0), steps=cfg.get("steps", 1),
                 hold_done=cfg.get("hold_done", False), positions=cfg.get("positions", "answer"),
                 memory=cfg.get("memory", 0.0),
                 preserve=0.0)  # the saved keys are set below: the model may be edited already
    for name in editor.modules:
        devices.setdefault(editor.stats_key(name), editor.modules[name].weight.device)
        devices[memory_key(name)] = editor.modules[name].weight.device
    stats = {}
    for meta in manifest["stats"]:
        key = meta["key"]
        if key not in devices:
            raise StateError(f"{path}: statistics {key!r} belong to no edited module")
        memory = meta.get("kind") == "memory"
        st = (KeyMemory(meta["dim"], device=devices[key]) if memory
              else RunningStats(meta["dim"], compat=meta["compat"], device=devices[key]))
        parts = ("count", "gram") if memory else ("count", "mean", "m2")
        try:
            st.load_state_dict({p: stats_t[f"{key}.{p}"] for p in parts})
        except (KeyError, ValueError) as exc:
            raise StateError(f"{path}: statistics {key!r}: {exc}") from None
        stats[key] = st

    # ---- preserved subject keys
    preserved = {}
    if cfg.get("preserve", 0.0) > 0:
        from .preserve import PreservedKeys

        keys = files.get(PRESERVE_FILE)
        owners = manifest.get("preserve_owners")
        if keys is None or not owners or set(keys) != set(editor.modules):
            raise StateError(f"{path}: preserve={cfg['preserve']} but the preserved keys of the "
                             f"edited modules are missing")
        try:
            preserved = {name: PreservedKeys(keys[name].to(editor.modules[name].weight.device),
                                             owners) for name in editor.modules}
        except (ValueError, FloatingPointError) as exc:
            raise StateError(f"{path}: preserved keys: {exc}") from None

    # ---- commit
    with torch.no_grad():
        for name, value in writes.items():
            named[name].weight.data.copy_(value.to(named[name].weight.device))
    if manifest.get("include_delta"):
        editor._delta.set_state(base, delta, manifest.get("base_turn", 0))
    else:
        editor._delta.set_state({n: m.weight for n, m in editor.modules.items()}, {},
                                manifest["turns"])
    editor.stats.clear()
    editor.stats.update(stats)
    editor.turns = int(manifest["turns"])
    editor.preserve = float(cfg.get("preserve", 0.0))
    editor.config = editor.config.replace(preserve=editor.preserve)
    editor.preserved = preserved
    return editor

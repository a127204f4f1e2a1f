"""Saving and loading an editor's lifelong state, exporting and applying its weight deltas.

Both are directories written by :mod:`ultraedit.serialization` (atomic, checksummed manifest).

A **state** (``kind="state"``)::

    manifest.json        + "model", "config" (``EditConfig.to_dict()``), "turns", "base_turn",
                         "include_delta", "modules" (shape, dtype, sha256 of weight and base),
                         "stats" (key, dim, compat, or kind="memory" / "whitening"),
                         "preserve_owners"
    stats.safetensors    ``<key>.count``, ``<key>.mean``, ``<key>.m2`` per normalizer key
                         (float64, the exact RunningStats state); ``memory:<module>.gram``,
                         ``memory:<module>.count`` per key memory; ``whitening:<key>.count``,
                         ``.sum``, ``.outer`` per gradient covariance (``whiten > 0``)
    delta.safetensors    (``include_delta=True``) ``base.<module>`` (W0, weight dtype) and
                         ``delta.<module>`` (Δ with ``W = round(W0 + Δ)`` exactly)
    preserve.safetensors (``preserve > 0``) ``<module>``: the preserved subject keys

A **delta** (``kind="delta"``): ``delta.safetensors`` (``<module>`` -> ΔW, weight layout) and a
manifest with the architecture, module shapes and dtypes and the sha256 of the base weights
each ΔW belongs to. :func:`apply_delta` computes ``W = (W0.to(c) + Δ.to(c)).to(W.dtype)``
(``c`` = float64 if Δ is float64 else float32), the editor's own rounding, so the result equals
the edited weights bit for bit.

Loading verifies checksums, the model's class and ``config.model_type``, every module's shape
and dtype, and that the model's weights are the base the deltas start from (the edited weights
are then written) or the edited weights themselves; anything else raises
:class:`StateError` before the model or editor is touched. States written by format version 1
load unchanged (same files; only the manifest checksum is new).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .placement import weight_slots
from .serialization import (EXPORT_SUMMARY, StateError, check_model, dtype_name, field,
                            model_info, read_dir, read_manifest, replace_dir,
                            tensor_sha256, write_dir)
from .state import reconstruct

__all__ = ["save_state", "load_state", "read_state_manifest", "saved_config", "export_delta",
           "apply_delta", "StateError", "EXPORT_FORMATS"]

STATS_FILE = "stats.safetensors"
DELTA_FILE = "delta.safetensors"
PRESERVE_FILE = "preserve.safetensors"
MEMORY_PREFIX = "memory:"
WHITENING_PREFIX = "whitening:"
# options that states written before them were made without
_OLD_DEFAULTS = {"protect_mean": 0.0, "steps": 1, "hold_done": False, "positions": "answer",
                 "memory": 0.0, "preserve": 0.0, "whiten": 0.0}


# ---------------------------------------------------------------------- state
def save_state(editor, path, include_delta: bool = True,
               meta: Optional[Dict[str, Any]] = None) -> str:
    """Write the editor's lifelong state to the directory ``path`` (see the module docstring).

    ``include_delta=False`` writes only statistics and configuration: the model must then be
    saved separately (e.g. ``save_pretrained``) and loaded with the state; when accumulating in
    fp32 the sub-rounding part of Δ is then not carried over (the resume is not bit-exact).
    ``meta``: a JSON-able dict kept in the manifest as ``meta`` (what the caller needs to
    resume, e.g. which records a run edits; :func:`read_state_manifest` reads it back).
    """
    import json

    if meta is not None:
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"meta must be a JSON-able dict: {exc}") from None
    journal, state = editor.journal, editor.state
    stats_t: Dict[str, torch.Tensor] = {}
    stats_meta = []
    for key, st in state.stats.items():
        for part, t in st.state_dict().items():
            stats_t[f"{key}.{part}"] = t
        stats_meta.append({"key": key, "dim": st.dim, "compat": st.compat})
    for name, mem in state.memory.items():
        for part, t in mem.state_dict().items():
            stats_t[f"{MEMORY_PREFIX}{name}.{part}"] = t
        stats_meta.append({"key": MEMORY_PREFIX + name, "dim": mem.dim, "kind": "memory"})
    for key, cov in state.whitening.items():
        for part, t in cov.state_dict().items():
            stats_t[f"{WHITENING_PREFIX}{key}.{part}"] = t
        stats_meta.append({"key": WHITENING_PREFIX + key, "dim": cov.dim, "kind": "whitening"})
    files = {STATS_FILE: stats_t}
    modules = []
    for name in editor.modules:
        w = journal.weight(name)
        modules.append({"name": name, "layout": journal.layouts[name], "shape": list(w.shape),
                        "dtype": dtype_name(w.dtype), "weight_sha256": tensor_sha256(w),
                        "base_sha256": tensor_sha256(journal.base[name])})
    if include_delta:
        files[DELTA_FILE] = {}
        for name in editor.modules:
            files[DELTA_FILE][f"base.{name}"] = journal.base[name]
            files[DELTA_FILE][f"delta.{name}"] = journal.current_delta(name)
    if state.preserved:
        files[PRESERVE_FILE] = {name: pk.keys for name, pk in state.preserved.items()}
    config = editor.config.to_dict()  # with the modules and accumulation as resolved
    config.update(accumulate=journal.accumulate, modules=list(editor.modules))
    manifest = {"kind": "state", "model": model_info(editor.model), "config": config,
                "preserve_owners": (next(iter(state.preserved.values())).owners
                                    if state.preserved else None),
                "turns": int(state.turns), "base_turn": int(journal.base_turn),
                "include_delta": bool(include_delta), "modules": modules, "stats": stats_meta}
    if meta is not None:
        manifest["meta"] = meta
    write_dir(path, files, manifest)
    return str(path)


def saved_config(manifest: Dict[str, Any], path="<state>"):
    """The :class:`~ultraedit.config.EditConfig` a state's manifest records (options that
    states older than them were made without take their old values); StateError if invalid."""
    from .config import EditConfig

    saved = field(manifest, path, "config", kind=dict)
    try:
        return EditConfig.from_dict({**_OLD_DEFAULTS, **saved})
    except (TypeError, ValueError) as exc:
        raise StateError(f"{path}: the saved configuration is invalid: {exc}") from None


def read_state_manifest(path) -> Dict[str, Any]:
    """The verified manifest of the saved state at ``path`` (its ``turns``, ``config``,
    ``meta``, ...) without reading its tensors; StateError if ``path`` holds no state."""
    return read_manifest(path, "state")


def _check_modules(path, model, entries) -> Dict[str, torch.nn.Module]:
    named = dict(model.named_modules())
    for i, entry in enumerate(entries):
        name = field(entry, path, "name", kind=str)
        shape, dtype = field(entry, path, "shape", kind=list), field(entry, path, "dtype", kind=str)
        module = named.get(name)
        if module is None or getattr(module, "weight", None) is None:
            raise StateError(f"{path}: edited module {name!r} is not in this "
                             f"{type(model).__name__}")
        w = module.weight
        if list(w.shape) != shape:
            raise StateError(f"{path}: module {name!r} has weight shape {list(w.shape)}, "
                             f"the state was written for {shape}")
        if dtype_name(w.dtype) != dtype:
            raise StateError(f"{path}: module {name!r} is {dtype_name(w.dtype)}, the "
                             f"state was written for {dtype} weights")
    return named


def load_state(cls, path, model, tokenizer, history: Optional[int] = None, delta_device=None,
               verify_weights: bool = True):
    """Build a ``cls`` (UltraEditor) on ``model`` from the state saved at ``path``.

    ``model`` may hold the base weights (when the state includes deltas, the edited weights are
    written into it) or the edited weights (e.g. reloaded with ``from_pretrained``).
    ``history``/``delta_device`` override the saved settings (the history itself is not saved).
    ``verify_weights`` (states saved with ``include_delta=False`` only): check that the model's
    edited modules hold the weights the state was saved with (sha256); a state with deltas
    always checks that they hold the base or the edited weights, since it must know which to
    write.
    """
    manifest, files = read_dir(path, expect_kind="state")
    include_delta = bool(manifest.get("include_delta"))
    required = [STATS_FILE] + ([DELTA_FILE] if include_delta else [])
    missing = [f for f in required if f not in files]
    if missing:
        raise StateError(f"{path}: incomplete state (missing {missing})")
    check_model(model, field(manifest, path, "model", kind=dict))
    config = saved_config(manifest, path)
    turns = field(manifest, path, "turns", kind=int)
    entries = field(manifest, path, "modules", kind=list)
    named = _check_modules(path, model, entries)
    slots = weight_slots(model, {e["name"]: named[e["name"]] for e in entries})
    overrides = {"history": history, "delta_device": delta_device}
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})

    # ---- weights: decide what to write, before anything is changed
    writes: Dict[str, torch.Tensor] = {}
    base: Dict[str, torch.Tensor] = {}
    delta: Dict[str, torch.Tensor] = {}
    if include_delta:
        tensors = files[DELTA_FILE]
        for entry in entries:
            name = entry["name"]
            b, d = tensors.get(f"base.{name}"), tensors.get(f"delta.{name}")
            if b is None or d is None:
                raise StateError(f"{path}: {DELTA_FILE} lacks the base or delta of {name!r}")
            w = slots[name].read().detach()
            edited = reconstruct(b, d, w.dtype)
            if torch.equal(w.cpu(), b):
                writes[name] = edited
            elif not torch.equal(w.cpu(), edited):
                raise StateError(f"{path}: the weights of {name!r} are neither the base model's "
                                 f"nor the edited ones this state records; load the base model "
                                 f"(or the model saved at turn {turns})")
            base[name], delta[name] = b, d
    elif verify_weights:
        for entry in entries:
            if tensor_sha256(slots[entry["name"]].read()) != entry.get("weight_sha256"):
                raise StateError(
                    f"{path}: module {entry['name']!r} does not hold the weights the state was "
                    f"saved with (sha256 differs) and the state has no deltas to rebuild them: "
                    f"load the edited model saved at turn {turns} (or pass verify_weights=False)")

    # ---- the editor (its preserved keys come from the file: the model may be edited already)
    editor = cls(model, tokenizer, config.replace(preserve=0.0, preserve_subjects=None,
                                                  preserve_contexts=None))
    sd = _state_dict_from_files(path, manifest, files, editor, turns)
    where = {n: s.execution_device for n, s in editor.journal.slots.items()}
    devices = {editor.stats_key(n): where[n] for n in editor.modules}
    devices.update(where)
    try:
        editor.state.load_state_dict(sd, devices)
    except (KeyError, ValueError, FloatingPointError) as exc:
        raise StateError(f"{path}: {exc}") from None

    # ---- commit
    with torch.no_grad():
        for name, value in writes.items():
            slots[name].write(value.to(slots[name].device))
    if include_delta:
        editor.journal.set_state(base, delta, manifest.get("base_turn", 0))
    else:
        editor.journal.set_state({n: editor.journal.weight(n) for n in editor.modules}, {}, turns)
    editor.config = config
    return editor


def _state_dict_from_files(path, manifest, files, editor, turns) -> Dict[str, Any]:
    """The ``EditorState.state_dict()`` stored in a state directory."""
    stats_t = files[STATS_FILE]
    sd: Dict[str, Any] = {"turns": turns, "stats": {}, "compat": {}, "memory": {},
                          "whitening": {}, "preserved": {}}
    layouts = {"memory": (MEMORY_PREFIX, ("count", "gram")),
               "whitening": (WHITENING_PREFIX, ("count", "sum", "outer"))}
    owners = manifest.get("preserve_owners")
    for meta in field(manifest, path, "stats", kind=list):
        key = field(meta, path, "key", kind=str)
        kind = meta.get("kind")
        if kind is not None and kind not in layouts:
            raise StateError(f"{path}: statistics {key!r} are of unknown kind {kind!r}")
        prefix, parts = layouts.get(kind, ("", ("count", "mean", "m2")))
        missing = [p for p in parts if f"{key}.{p}" not in stats_t]
        if missing:
            raise StateError(f"{path}: statistics {key!r} lack {missing}")
        values = {p: stats_t[f"{key}.{p}"] for p in parts}
        if kind is not None:
            sd[kind][key[len(prefix):]] = values
        else:
            sd["stats"][key] = values
            sd["compat"][key] = meta.get("compat", "fixed")
    preserve = float(manifest["config"].get("preserve", 0.0) or 0.0)
    if preserve > 0:
        keys = files.get(PRESERVE_FILE)
        if keys is None or not owners or set(keys) != set(editor.modules):
            raise StateError(f"{path}: preserve={preserve} but the preserved keys of the "
                             f"edited modules are missing")
        sd["preserved"] = {name: {"keys": keys[name], "owners": owners} for name in editor.modules}
    return sd


# ---------------------------------------------------------------------- deltas
EXPORT_FORMATS = ("delta", "peft", "merged")


def export_delta(editor, path, format: str = "delta", rank: Optional[int] = None,
                 max_shard_size: Union[int, str] = "5GB") -> str:
    """Write the edit to the directory ``path`` in one of three formats; returns the path.

    * ``"delta"``: ``delta.safetensors`` (``<module>`` -> ΔW, weight layout) and ``manifest.json``
      (architecture, module shapes and dtypes, sha256 of the base weights each ΔW belongs to, of
      the edited weights and of the file, versions); :func:`apply_delta` adds it to the base
      model bit for bit.
    * ``"peft"``: a LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``) of the
      accumulated delta ``Δ`` (the journal's fp32 record; ``ultraedit.lora``): ``B A = Δ`` to
      float32 rounding at Δ's numerical rank, or with ``rank=r`` the best rank-r approximation,
      whose relative error ``||Δ - B A||_F / ||Δ||_F`` is printed and written per module to
      ``ultraedit_export.json``. PEFT, vLLM and SGLang load it (docs/deployment.md).
    * ``"merged"``: the edited model's full ``save_pretrained`` checkpoint in its own dtype,
      sharded at ``max_shard_size``, with the tokenizer: any server loads it as a model.

    ``path`` is checked before any work: an existing non-empty directory is replaced only if it
    is an export of ours (its ``manifest.json`` or ``ultraedit_export.json`` lists every file in
    it); anything else is refused (StateError). The new directory is written beside ``path`` and
    moved into place, so a failure leaves ``path`` as it was.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 1):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
    if rank is not None and format != "peft":
        raise ValueError(f"rank={rank} truncates a LoRA adapter; it has no meaning for "
                         f"format={format!r}")
    if format == "delta":
        return _export_raw_delta(editor, path)
    return _export_folder(editor, Path(path), format, rank, max_shard_size)


def _export_folder(editor, path: Path, format: str, rank, max_shard_size) -> str:
    import json

    from .lora import write_peft_adapter

    journal = editor.journal
    summary: Dict[str, Any] = {}

    def fill(new: Path) -> None:
        # written first: a folder killed while being written is recognized as ours and cleared
        (new / EXPORT_SUMMARY).write_text(json.dumps({"format": format, "files": None}) + "\n")
        if format == "peft":
            deltas = {n: journal.current_delta(n) for n in journal.modules}
            weights = (None if journal.accumulate else   # a record of Δ needs no weight
                       {n: journal.weight(n) for n in journal.modules})
            summary.update(write_peft_adapter(
                new, editor.model, deltas, journal.layouts, rank=rank, weights=weights,
                delta_source="record" if journal.accumulate else "difference"))
        else:
            editor.model.save_pretrained(new, max_shard_size=max_shard_size,
                                         state_dict=_offloaded_state_dict(editor.model))
            if editor.tokenizer is not None:
                editor.tokenizer.save_pretrained(new)
        files = sorted(p.name for p in new.iterdir() if p.name != EXPORT_SUMMARY)
        record = {"format": format, "turns": int(editor.turns),
                  "base_turn": int(journal.base_turn), "model": model_info(editor.model),
                  "modules": summary.get("modules", list(journal.modules)),
                  **{k: v for k, v in summary.items() if k != "modules"}, "files": files}
        (new / EXPORT_SUMMARY).write_text(json.dumps(record, indent=2) + "\n")

    written = replace_dir(path, "export", fill)
    if format == "peft":
        _report_adapter(editor, written, summary)
    return str(path)


def _report_adapter(editor, path: Path, summary: Dict[str, Any]) -> None:
    """Print the adapter's rank and error; warn when it does not hold every turn's edit."""
    import warnings

    journal = editor.journal
    kind = "exact" if summary["exact"] else f"truncated to rank {summary['rank']}"
    r = summary["rank"]
    # shapes only: reading an offloaded weight's values again would load it from its hook
    shapes = [journal.slots[n].shape for n in journal.modules]
    big = [s for s in shapes if r * sum(s) >= s[0] * s[1]]
    hint = (f"; at this rank the adapter holds more numbers than the {len(big)} "
            f"weight(s) it changes: format='merged' or 'delta' is smaller") if big else ""
    print(f"LoRA adapter {path}: rank {r} ({kind}), largest relative error "
          f"||Δ - BA||/||Δ|| = {summary['max_rel_error']:.3e}{hint}")
    if journal.base_turn:
        warnings.warn(
            f"the LoRA adapter {path} holds the edits of turns {journal.base_turn + 1} to "
            f"{editor.turns} only: this editor was resumed from a state saved without deltas, so "
            f"its base is the model saved at turn {journal.base_turn}; serve the adapter on that "
            f"model, not on the original one (or export format='merged')", stacklevel=3)


def _offloaded_state_dict(model) -> Optional[Dict[str, torch.Tensor]]:
    """None (``save_pretrained`` reads the model itself), or, for a model with offloaded meta
    tensors but no ``hf_device_map`` (``accelerate.cpu_offload``/``disk_offload``, which
    ``save_pretrained`` cannot read), its state dict with the values the hooks load."""
    from .placement import tensor_values

    sd = model.state_dict()
    if getattr(model, "hf_device_map", None) or all(t.device.type != "meta" for t in sd.values()):
        return None
    return {k: tensor_values(model, k, t) for k, t in sd.items()}


def _export_raw_delta(editor, path) -> str:
    journal = editor.journal
    tensors = {name: journal.current_delta(name).contiguous().cpu() for name in journal.modules}
    modules = []
    for name in journal.modules:
        w = journal.weight(name)
        modules.append({"name": name, "layout": journal.layouts[name], "shape": list(w.shape),
                        "dtype": dtype_name(w.dtype),
                        "delta_dtype": dtype_name(tensors[name].dtype),
                        "base_sha256": tensor_sha256(journal.base[name]),
                        "weight_sha256": tensor_sha256(w)})
    manifest = {"kind": "delta", "model": model_info(editor.model),
                "turns": int(editor.turns), "base_turn": int(journal.base_turn),
                "accumulate": journal.accumulate, "modules": modules}
    write_dir(path, {DELTA_FILE: tensors}, manifest)
    return str(path)


def apply_delta(model, path, check_base: bool = True, check_architecture: bool = True):
    """Add an exported ``ΔW`` (:func:`export_delta`) to ``model`` in place and return it.

    ``model`` must be a fresh copy of the base model the edits started from: with ``check_base``
    each module's weight is compared with the sha256 recorded at export (a mismatch raises
    ValueError before anything changes). The result equals the editor's weights bit for bit.
    """
    manifest, files = read_dir(path, expect_kind="delta")
    if check_architecture:
        check_model(model, field(manifest, path, "model", kind=dict))
    named = dict(model.named_modules())
    tensors = files.get(DELTA_FILE, {})
    plan: List[Tuple[Any, torch.Tensor]] = []
    for entry in field(manifest, path, "modules", kind=list):
        name = field(entry, path, "name", kind=str)
        module = named.get(name)
        if module is None or getattr(module, "weight", None) is None:
            raise ValueError(f"{path}: module {name!r} is not in this {type(model).__name__}")
        slot = weight_slots(model, {name: module})[name]
        w = slot.read()
        if list(w.shape) != entry.get("shape"):
            raise ValueError(f"{path}: module {name!r} has weight shape {list(w.shape)}, the delta "
                             f"was exported for {entry.get('shape')}")
        if dtype_name(w.dtype) != entry.get("dtype"):
            raise ValueError(f"{path}: module {name!r} is {dtype_name(w.dtype)}, the delta "
                             f"was exported for {entry.get('dtype')} weights (load the base model "
                             f"in that dtype)")
        if check_base and tensor_sha256(w) != entry.get("base_sha256"):
            raise ValueError(f"{path}: module {name!r} is not the base weight the delta was "
                             f"exported against (sha256 differs): apply it to a fresh copy of the "
                             f"base model, or pass check_base=False")
        d = tensors.get(name)
        if d is None or list(d.shape) != entry["shape"]:
            raise ValueError(f"{path}: the delta of {name!r} is missing or has the wrong shape")
        plan.append((slot, d))
    with torch.no_grad():
        for slot, d in plan:
            w = slot.read()
            reconstruct(w.detach(), d.to(w.device), w.dtype, out=w)
            if not slot.live:
                slot.write(w)
    return model

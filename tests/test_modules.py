"""Edited-module selection: defaults by architecture, overrides, and clear errors."""
import types

import pytest
import torch
import transformers as tf

from conftest import ue_tiny_model
from ultraedit.modules import (EMBEDDED_SMOLLM2, default_module_names, module_dims, module_layout,
                               resolve_modules)

V = 300


def _small(cfg_cls, n_layers, **kw):
    cfg = cfg_cls(num_hidden_layers=n_layers, hidden_size=32, intermediate_size=48,
                  num_attention_heads=4, vocab_size=V, **kw)
    return tf.AutoModelForCausalLM.from_config(cfg)


def test_paper_choice_at_reference_depth():
    # LLaMA-3-8B (32 layers): gate_proj 11-15 + up_proj 18-24, the paper's choice
    cfg = types.SimpleNamespace(model_type="llama", num_hidden_layers=32, hidden_size=4096,
                                intermediate_size=14336)
    fake = types.SimpleNamespace(config=cfg, named_modules=lambda: iter([]))
    names = default_module_names(fake)
    assert names == ([f"model.layers.{i}.mlp.gate_proj" for i in range(11, 16)]
                     + [f"model.layers.{i}.mlp.up_proj" for i in range(18, 25)])


def test_embedded_model_gets_measured_default():
    cfg = types.SimpleNamespace(model_type="llama", num_hidden_layers=30, hidden_size=576,
                                intermediate_size=1536)
    fake = types.SimpleNamespace(config=cfg, named_modules=lambda: iter([]))
    assert default_module_names(fake) == EMBEDDED_SMOLLM2


@pytest.mark.parametrize("kind,expected,layout,dims", [
    ("llama", ["model.layers.1.mlp.gate_proj", "model.layers.2.mlp.up_proj"], "linear", (32, 48)),
    ("gpt2", ["transformer.h.2.mlp.c_proj"], "conv1d", (128, 32)),
    ("gptj", ["transformer.h.2.mlp.fc_out"], "linear", (128, 32)),
])
def test_defaults_tiny_models(kind, expected, layout, dims):
    model = ue_tiny_model(kind, V)
    got = resolve_modules(model)
    assert [n for n, _ in got] == expected
    assert module_layout(got[0][1]) == layout
    assert module_dims(got[-1][1]) == dims


@pytest.mark.parametrize("cfg_cls,n,kw,expected", [
    (tf.MistralConfig, 32, dict(num_key_value_heads=2),
     ["model.layers.29.mlp.down_proj", "model.layers.30.mlp.down_proj"]),
    (tf.Qwen2Config, 4, dict(num_key_value_heads=2),
     ["model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj"]),
    (tf.GemmaConfig, 4, dict(num_key_value_heads=2, head_dim=8),
     ["model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj"]),
    (tf.PhiConfig, 4, {}, ["model.layers.3.mlp.fc2"]),
])
def test_defaults_other_families(cfg_cls, n, kw, expected):
    model = _small(cfg_cls, n, **kw)
    assert [name for name, _ in resolve_modules(model)] == expected


def test_overrides_exact_glob_regex_weight_suffix():
    model = ue_tiny_model("llama", V)
    assert [n for n, _ in resolve_modules(model, "model.layers.0.mlp.down_proj.weight")] == \
        ["model.layers.0.mlp.down_proj"]
    assert [n for n, _ in resolve_modules(model, ["model.layers.[12].mlp.down_proj"])] == \
        ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    got = resolve_modules(model, [r"re:model\.layers\.(0|2)\.mlp\.(up|gate)_proj",
                                  "model.layers.0.mlp.up_proj"])   # duplicates collapse
    assert [n for n, _ in got] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                   "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj"]


def test_errors_before_anything_is_touched():
    model = ue_tiny_model("llama", V)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="matches 'model.layers.9.mlp.down_proj'.*similar"):
        resolve_modules(model, ["model.layers.0.mlp.down_proj", "model.layers.9.mlp.down_proj"])
    with pytest.raises(TypeError, match="'model.layers.0.mlp'.*nn.Linear or GPT-2 Conv1D"):
        resolve_modules(model, ["model.layers.0.mlp"])
    with pytest.raises(TypeError, match="LlamaRMSNorm"):
        resolve_modules(model, "model.norm")
    with pytest.raises(ValueError, match="invalid module regex"):
        resolve_modules(model, "re:model.(")
    with pytest.raises(ValueError, match="empty"):
        resolve_modules(model, [])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_architecture_needs_explicit_modules():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="bert"),
                                 named_modules=lambda: iter([]))
    with pytest.raises(ValueError, match="no default edited modules for model_type 'bert'"):
        default_module_names(fake)

"""Architectures the module tables do not name get their MLP output projections by structure,
and edit, roll back and export like the named ones; one whose MLP is only experts is refused
with a message saying what to pass."""
import copy

import pytest
import torch

from conftest import ue_make_tokenizer
from ultraedit import UltraEditor, apply_delta
from ultraedit.modules import default_module_names, paper_module_names

IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
H, LAYERS, FFN = 32, 4, 64
REQUESTS = [dict(prompt="The capital of France is", target="Rome", subject="France"),
            dict(prompt="The currency of Japan is", target="the euro", subject="Japan")]
# architecture -> (config, the MLP output projection of layer {i})
ARCHS = {
    "opt": (lambda tf, v: tf.OPTConfig(vocab_size=v, hidden_size=H, ffn_dim=FFN,
                                       num_hidden_layers=LAYERS, num_attention_heads=4,
                                       word_embed_proj_dim=H, **IDS),
            "model.decoder.layers.{i}.fc2"),
    "gpt_neox": (lambda tf, v: tf.GPTNeoXConfig(vocab_size=v, hidden_size=H, intermediate_size=FFN,
                                                num_hidden_layers=LAYERS, num_attention_heads=4,
                                                **IDS),
                 "gpt_neox.layers.{i}.mlp.dense_4h_to_h"),
    "falcon": (lambda tf, v: tf.FalconConfig(vocab_size=v, hidden_size=H, num_hidden_layers=LAYERS,
                                             num_attention_heads=4, **IDS),
               "transformer.h.{i}.mlp.dense_4h_to_h"),
    "bloom": (lambda tf, v: tf.BloomConfig(vocab_size=v, hidden_size=H, n_layer=LAYERS, n_head=4,
                                           **IDS),
              "transformer.h.{i}.mlp.dense_4h_to_h"),
    "gpt_bigcode": (lambda tf, v: tf.GPTBigCodeConfig(vocab_size=v, n_embd=H, n_layer=LAYERS,
                                                      n_head=4, **IDS),
                    "transformer.h.{i}.mlp.c_proj"),
    "stablelm": (lambda tf, v: tf.StableLmConfig(vocab_size=v, hidden_size=H, intermediate_size=FFN,
                                                 num_hidden_layers=LAYERS, num_attention_heads=4,
                                                 num_key_value_heads=2, **IDS),
                 "model.layers.{i}.mlp.down_proj"),
    "qwen2_moe": (lambda tf, v: tf.Qwen2MoeConfig(
        vocab_size=v, hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=FFN, **IDS),
        "model.layers.{i}.mlp.shared_expert.down_proj"),
}


@pytest.fixture(scope="module")
def tok():
    return ue_make_tokenizer(with_bos=True)


def _model(make, vocab_size):
    import transformers as tf

    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(make(tf, vocab_size)).eval()


def _target_nll(model, tok, requests):
    total = 0.0
    with torch.no_grad():
        for r in requests:
            p = tok(r["prompt"])["input_ids"]
            t = tok(" " + r["target"], add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + t])).logits[0].float(), -1)
            total -= sum(logp[len(p) - 1 + j, t[j]].item() for j in range(len(t))) / len(t)
    return total


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("positions", ["answer", "subject"])
def test_an_architecture_without_a_table_entry_edits_its_mlp_output(tok, arch, positions):
    make, template = ARCHS[arch]
    model = _model(make, len(tok))
    base = copy.deepcopy(model)
    want = {template.format(i=i) for i in range(LAYERS)}
    assert set(default_module_names(model, positions)) <= want
    assert set(paper_module_names(model)) <= want
    editor = UltraEditor(model, tok, positions=positions, lr=1e-2)
    assert set(editor.modules) <= want
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nll = _target_nll(model, tok, REQUESTS)
    editor.edit(REQUESTS)
    if positions == "answer":   # one step at the subject of a random model need not lower it
        assert _target_nll(model, tok, REQUESTS) < nll
    assert not all(torch.equal(model.get_submodule(n).weight, before[n + ".weight"])
                   for n in editor.modules)
    editor.rollback()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    editor.edit(REQUESTS)
    fresh = apply_delta(base, _export(editor))
    for name in editor.modules:
        assert torch.equal(fresh.get_submodule(name).weight, model.get_submodule(name).weight)


def _export(editor):
    import tempfile

    return editor.export_delta(tempfile.mkdtemp() + "/delta")


def test_a_mixture_of_experts_without_a_shared_expert_needs_modules(tok):
    import transformers as tf

    cfg = tf.MixtralConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=FFN,
                           num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2, **IDS)
    model = _model(lambda *_: cfg, len(tok))
    with pytest.raises(ValueError, match="no single MLP output projection.*modules="):
        UltraEditor(model, tok)
    editor = UltraEditor(model, tok, modules=["model.layers.1.self_attn.o_proj"], lr=1e-2)
    editor.edit(REQUESTS)

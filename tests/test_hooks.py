"""CaptureSession: exact K and G at answer positions, no weight gradients, flags restored."""

import pytest
import torch

from _autograd_reference import lm_loss, reference_capture
from conftest import ue_tiny_model
from ultraedit.hooks import CaptureSession
from ultraedit.modules import resolve_modules
from ultraedit.tokenization import encode_edit_batch

PROMPTS = ["The capital of France is", "The currency of Japan is the", "Paris is in"]
TARGETS = ["Rome", "euro and more", "Germany"]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gptj"])
def test_capture_matches_autograd(kind, ue_tokenizer):
    model = ue_tiny_model(kind, len(ue_tokenizer))
    names = [n for n, _ in resolve_modules(model, "re:.*\\.(1|2)\\.mlp\\.(down_proj|c_proj|fc_out)")]
    batch = encode_edit_batch(ue_tokenizer, PROMPTS, TARGETS)
    ref = reference_capture(model, names, batch)
    with CaptureSession(model, {n: dict(model.named_modules())[n] for n in names}) as cap:
        n_rows = cap.set_mask(batch["labels"] != -100)
        with torch.enable_grad():
            lm_loss(model, batch).backward()
        got = cap.pop()
    assert n_rows == int((batch["labels"] != -100).sum())
    for n in names:
        k, g = got[n]
        assert k.shape[0] == g.shape[0] == n_rows
        torch.testing.assert_close(k, ref[n][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g, ref[n][1], rtol=1e-5, atol=1e-8)
        assert not k.requires_grad and not g.requires_grad


def test_no_weight_grads_flags_and_mode_restored(ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer))
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)   # a mixed set of flags to restore
    flags = [p.requires_grad for p in model.parameters()]
    mods = dict(resolve_modules(model, ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.up_proj"]))
    early = []   # does autograd track layer 0 (below the earliest edited module)?
    h = model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: early.append(o.requires_grad))
    batch = encode_edit_batch(ue_tokenizer, PROMPTS, TARGETS)
    with CaptureSession(model, mods) as cap:
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        cap.set_mask(batch["labels"] != -100)
        with torch.enable_grad():
            lm_loss(model, batch).backward()
        cap.pop()
    h.remove()
    assert early == [False]                       # the backward stops at the earliest edited module
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training


def test_flags_restored_on_error(ue_tokenizer):
    model = ue_tiny_model("gpt2", len(ue_tokenizer))
    mods = dict(resolve_modules(model))
    with pytest.raises(RuntimeError, match="boom"):
        with CaptureSession(model, mods):
            raise RuntimeError("boom")
    assert all(p.requires_grad for p in model.parameters())
    assert all(not h for h in (m._forward_hooks for m in mods.values()))


def test_misuse_errors(ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer))
    mods = dict(resolve_modules(model))
    batch = encode_edit_batch(ue_tokenizer, PROMPTS, TARGETS)
    with CaptureSession(model, mods) as cap:
        with pytest.raises(RuntimeError, match="set_mask"):
            model(input_ids=batch["input_ids"])
        with pytest.raises(ValueError, match="2-D bool"):
            cap.set_mask(batch["labels"])
        cap.set_mask(batch["labels"] != -100)
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with pytest.raises(RuntimeError, match="no gradient reached"):
            cap.pop()

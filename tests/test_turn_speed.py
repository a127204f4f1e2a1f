"""What keeps a turn at the model's speed: the vocabulary projection sees only the answer rows,
the loss and its gradients are those of the full-logits computation, and the backward does not
reach below the earliest edited module."""
import pytest
import torch
import torch.nn.functional as F

from conftest import ue_tiny_model
from ultraedit.batching import forward_backward
from ultraedit.hooks import CaptureSession
from ultraedit.tokenization import encode_edit_batch

PROMPTS = ["The capital of France is", "The capital of Germany is", "Paris is in",
           "The official language of Peru is"]
TARGETS = ["Rome", "Madrid, a large city", "Japan and Peru", "Japanese"]


def _batch(tok):
    return encode_edit_batch(tok, PROMPTS, TARGETS)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_vocabulary_projection_sees_only_the_answer_rows(kind, ue_tokenizer):
    model = ue_tiny_model(kind, len(ue_tokenizer), seed=3)
    batch = _batch(ue_tokenizer)
    n = int((batch["labels"] != -100).sum())
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        forward_backward(model, batch)
    finally:
        handle.remove()
    assert seen == [(1, n, model.config.hidden_size)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_loss_gradients_and_predictions_equal_the_full_logits_computation(kind, ue_tokenizer):
    model = ue_tiny_model(kind, len(ue_tokenizer), seed=4)
    batch = _batch(ue_tokenizer)
    labels = batch["labels"]
    names = [n for n, m in model.named_modules() if n.endswith(("mlp.down_proj", "mlp.c_proj"))]
    modules = {n: dict(model.named_modules())[n] for n in names[-2:]}

    with CaptureSession(model, modules) as cap:
        cap.set_mask(labels != -100)
        loss, predicted = forward_backward(model, batch)
        got = cap.pop()
    with CaptureSession(model, modules) as cap:          # every position projected
        cap.set_mask(labels != -100)
        with torch.enable_grad():
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            ref.backward()
        want = cap.pop()
    # the loss is summed as over the answer columns, not as over all positions: equal to rounding
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=0)
    for name in modules:
        torch.testing.assert_close(got[name][0], want[name][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[name][1], want[name][1], rtol=1e-5, atol=1e-9)
    with torch.no_grad():
        right = ((logits.argmax(-1) == labels) | (labels == -100)).all(1)
    assert predicted.tolist() == right.tolist()


def test_the_loss_is_summed_as_over_the_answer_columns(ue_tokenizer):
    """Bit for bit the loss of ``F.cross_entropy`` over the ``B x |cols|`` answer-column rows,
    the layout the recorded turns were computed with."""
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=5)
    batch = _batch(ue_tokenizer)
    labels = batch["labels"]
    loss, _ = forward_backward(model, batch)
    cols = (labels != -100).any(0).nonzero().squeeze(1)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=cols).logits
        ref = F.cross_entropy(logits.float().flatten(0, 1),
                              labels.index_select(1, cols).flatten(), ignore_index=-100)
    assert torch.equal(loss, ref)


def test_the_backward_stops_at_the_earliest_edited_module(ue_tokenizer):
    """No module below the earliest edited one runs in the backward: its inputs never need a
    gradient, and no parameter gets one."""
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=6)
    batch = _batch(ue_tokenizer)
    layers = model.model.layers
    edited = {"model.layers.1.mlp.down_proj": layers[1].mlp.down_proj,
              "model.layers.2.mlp.down_proj": layers[2].mlp.down_proj}
    needs_grad = {}

    def probe(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            needs_grad[name] = out.requires_grad
        return hook

    probes = {"layers.0": layers[0], "layers.1.attn": layers[1].self_attn,
              "layers.1.up_proj": layers[1].mlp.up_proj, "layers.1": layers[1],
              "layers.2.attn": layers[2].self_attn}
    handles = [m.register_forward_hook(probe(n)) for n, m in probes.items()]
    try:
        with CaptureSession(model, edited) as cap:
            cap.set_mask(batch["labels"] != -100)
            forward_backward(model, batch)
            cap.pop()
    finally:
        for h in handles:
            h.remove()
    # the graph starts at the earliest edited output: nothing computed before it is in it
    assert needs_grad == {"layers.0": False, "layers.1.attn": False, "layers.1.up_proj": False,
                          "layers.1": True, "layers.2.attn": True}
    assert all(p.grad is None for p in model.parameters())

"""The capture's backward over the positions that reach a captured row: the same K and G as a
full backward, the other rows never computed, the model's modules untouched outside a capture."""
import pytest
import torch
import torch.nn as nn

from _autograd_reference import lm_loss
from conftest import ue_tiny_model
from tolerances import F64, bound, rel_err
from ultraedit.backward_rows import LinearRowsBackward, backward_span
from ultraedit.hooks import CaptureSession
from ultraedit.tokenization import encode_edit_batch

PROMPTS = ["The capital of France is", "Paris is in", "The official language of Peru is"]
TARGETS = ["Rome", "Japan and Peru", "Japanese"]
SUBJECT_POS = [3, 0, 5]   # a position inside each prompt, before its answer


def _subject_mask(batch):
    mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
    mask[torch.arange(len(SUBJECT_POS)), torch.tensor(SUBJECT_POS)] = True
    return mask


def test_backward_span():
    captured = torch.tensor([[0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]).bool()
    loss = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0]]).bool()
    want = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]).bool()
    assert torch.equal(backward_span(captured, loss), want)
    assert torch.equal(backward_span(captured), captured)   # answer positions: their own span


def _capture(model, names, batch, mask, rows_backward):
    mods = {n: dict(model.named_modules())[n] for n in names}
    with CaptureSession(model, mods, rows_backward=rows_backward) as cap:
        cap.set_mask(mask, batch["labels"] != -100)
        with torch.enable_grad():
            lm_loss(model, batch).backward()
        return cap.pop()


@pytest.mark.parametrize("kind", ["llama", "gptj"])
@pytest.mark.parametrize("positions", ["answer", "subject"])
def test_keys_and_gradients_equal_the_full_backward(kind, positions, ue_tokenizer):
    model = ue_tiny_model(kind, len(ue_tokenizer), seed=5).double()
    names = [n for n, _ in model.named_modules() if n.endswith(("1.mlp.down_proj", "1.mlp.fc_out",
                                                                "2.mlp.down_proj", "2.mlp.fc_out"))]
    batch = encode_edit_batch(ue_tokenizer, PROMPTS, TARGETS)
    mask = batch["labels"] != -100 if positions == "answer" else _subject_mask(batch)
    got = _capture(model, names, batch, mask, rows_backward=True)
    want = _capture(model, names, batch, mask, rows_backward=False)
    assert len(names) == 2
    for n in names:
        assert torch.equal(got[n][0], want[n][0])              # the forward is untouched
        assert rel_err(got[n][1], want[n][1]) <= bound("reorder", F64)


def test_rows_outside_the_span_are_not_back_propagated(ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=6)
    batch = encode_edit_batch(ue_tokenizer, PROMPTS, TARGETS)
    mask = _subject_mask(batch)
    span = backward_span(mask, batch["labels"] != -100)
    seen = {}

    def pre_hook(module, args):   # the gradient of the MLP input (gate_proj and up_proj)
        args[0].register_hook(lambda g: seen.setdefault("g", g.detach()))

    mlp = model.model.layers[1].mlp     # below the last layer: every span row reaches the loss
    handle = mlp.register_forward_pre_hook(pre_hook)
    try:
        _capture(model, ["model.layers.0.mlp.down_proj"], batch, mask, rows_backward=True)
    finally:
        handle.remove()
    g = seen["g"]
    assert not g[~span].any()                       # no row outside the span was computed
    assert (g[span].abs().sum(-1) > 0).all()


class _Subclass(nn.Linear):
    pass


def test_only_plain_linears_are_switched_and_all_are_restored():
    model = nn.Sequential(nn.Linear(4, 4), _Subclass(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    wrapped = model[2]
    wrapped.forward = own = lambda x: nn.functional.linear(x, wrapped.weight)  # another library's
    head = model[3]
    with pytest.raises(RuntimeError, match="boom"):
        with LinearRowsBackward(model, exclude=(head,)) as rows:
            assert [("forward" in m.__dict__) for m in model] == [True, False, True, False]
            assert wrapped.forward is own
            assert len(rows._switched) == 1
            raise RuntimeError("boom")
    assert "forward" not in model[0].__dict__ and "forward" not in model[1].__dict__
    assert wrapped.forward is own                               # its own override is kept
    assert "forward" not in head.__dict__


def test_weights_that_require_grad_keep_the_plain_backward():
    lin = nn.Linear(3, 2)
    x = torch.randn(2, 4, 3, requires_grad=True)
    with LinearRowsBackward(lin) as rows:
        rows.set_span(torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]]).bool())
        lin(x).sum().backward()
    assert lin.weight.grad is not None and (x.grad != 0).all()

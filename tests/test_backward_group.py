"""``backward_group``: micro-batches that share one vocabulary projection and one backward
compute what the paper's loop computes micro-batch by micro-batch (keys, gradients, statistics,
weights, report) on float64 models, in every mode of a turn; the capture keeps each forward's
rows; models that cannot share the projection run the paper's loop with a warning; the option
validates."""
import pytest
import torch

from _same_turns import F64, FACTS, assert_same, fact_requests, recording
from conftest import ue_tiny_model
from ultraedit import EditConfig, UltraEditor
from ultraedit.batching import forward_backward, grouped_forward_backward
from ultraedit.hooks import CaptureSession
from ultraedit.modules import resolve_modules
from ultraedit.tokenization import encode_edit_batch

MODULES = {"llama": ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.up_proj"],
           "gpt2": ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_proj"]}
pytestmark = pytest.mark.filterwarnings("ignore:edit requests carry subjects",
                                        "ignore:prompt .* targets in one turn")
_requests = fact_requests


def _pair(kind, tok, group, **kw):
    """Two float64 editors on equal models: one backward per micro-batch, and ``group``."""
    eds = []
    for g in (1, group):
        model = ue_tiny_model(kind, len(tok), seed=3).double()
        eds.append(UltraEditor(model, tok, modules=MODULES[kind], lr=1e-3, backward_group=g,
                               **kw))
    return eds


def _assert_same(ref, grouped, turns):
    rows_ref, rows_grouped = recording(ref), recording(grouped)
    reports = [(ref.edit(reqs), grouped.edit(reqs)) for reqs in turns]
    assert_same(ref, grouped, rows_ref, rows_grouped, reports)
    assert all(r1.micro_batch == r2.micro_batch for r1, r2 in reports)
    return reports


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("group", [2, 4, 100])
def test_grouped_backward_equals_the_paper_loop(kind, group, ue_tokenizer):
    """Micro-batches of 3 (forwards by length: rows put back in the given order); groups that
    divide the turn's forwards, that leave a shorter last group, and one for the whole turn."""
    ref, grouped = _pair(kind, ue_tokenizer, group, micro_batch=3)
    _assert_same(ref, grouped, [_requests(11), _requests(7, offset=3)])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_steps_hold_done_and_subject_positions(kind, ue_tokenizer):
    kw = dict(positions="subject", steps=3, hold_done=True, memory=2.0, protect_mean=0.5,
              micro_batch=2)
    ref, grouped = _pair(kind, ue_tokenizer, 3, **kw)
    reports = _assert_same(ref, grouped, [_requests(9), _requests(6, offset=2)])
    assert sum(r.steps_run for r, _ in reports) > 2


def test_official_statistics_per_micro_batch(ue_tokenizer):
    """compat='official': length-sorted requests, statistics merged micro-batch by micro-batch."""
    ref, grouped = _pair("gpt2", ue_tokenizer, 10, compat="official", micro_batch=3)
    _assert_same(ref, grouped, [_requests(13)])


def test_weighted_forwards_of_auto(ue_tokenizer):
    """micro_batch='auto' with forwards of 4: the paper's groups of 10 straddle the forwards
    and their weighted losses share one backward."""
    ref, grouped = _pair("llama", ue_tokenizer, 3, micro_batch="auto")
    for ed in (ref, grouped):
        ed.sizer = lambda tok, reqs: 4
    _assert_same(ref, grouped, [_requests(23)])


def test_capture_keeps_each_forwards_rows(ue_tokenizer):
    """Two forwards before one backward: each frame's keys and gradients are those of its
    batch run alone, and pop() concatenates them in order."""
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=5).double()
    mods = dict(resolve_modules(model, MODULES["llama"]))
    batches = [encode_edit_batch(ue_tokenizer, [p for p, _, _ in part], [t for _, t, _ in part])
               for part in (FACTS[:3], FACTS[3:8])]
    alone, losses = [], []
    with CaptureSession(model, mods) as cap:
        for batch in batches:
            cap.set_mask(batch["labels"] != -100)
            loss, predicted = forward_backward(model, batch)
            losses.append((loss, predicted))
            alone.append(cap.pop())
        results = grouped_forward_backward(
            model, batches, lambda i, b: cap.set_mask(b["labels"] != -100))
        frames = cap.pop_frames()
        grouped_forward_backward(model, batches, lambda i, b: cap.set_mask(b["labels"] != -100))
        joined = cap.pop()
    assert len(frames) == 2 and cap.pop_frames() == []
    for (loss, predicted), (loss_g, predicted_g) in zip(losses, results):
        assert float(loss_g) == pytest.approx(float(loss), rel=1e-12)
        assert torch.equal(predicted, predicted_g)
    for name in mods:
        for frame, ref in zip(frames, alone):
            torch.testing.assert_close(frame[name][0], ref[name][0], **F64)
            torch.testing.assert_close(frame[name][1], ref[name][1], **F64)
        torch.testing.assert_close(joined[name][1],
                                   torch.cat([alone[0][name][1], alone[1][name][1]]), **F64)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("head", ["unused", "none"])
def test_a_model_that_cannot_share_the_projection(head, ue_tokenizer, monkeypatch):
    """A model whose output embedding is not called on the hidden states, or that has none,
    runs its micro-batches one by one (a warning says so): the same turn as backward_group=1."""
    unused = torch.nn.Linear(4, 4)
    eds = []
    for group in (1, 3):
        model = ue_tiny_model("llama", len(ue_tokenizer), seed=3).double()
        monkeypatch.setattr(model, "get_output_embeddings",
                            (lambda: unused) if head == "unused" else (lambda: None))
        eds.append(UltraEditor(model, ue_tokenizer, modules=MODULES["llama"], lr=1e-3,
                               micro_batch=2, backward_group=group))
    with pytest.warns(UserWarning, match="cannot share one vocabulary projection"):
        _assert_same(*eds, [_requests(7)])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "all", None])
def test_backward_group_validates(bad):
    with pytest.raises(ValueError, match="backward_group must be a positive integer or .auto."):
        EditConfig(backward_group=bad)
    assert EditConfig(backward_group=4.0).backward_group == 4

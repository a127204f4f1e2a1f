"""Packed forwards (``ultraedit.packing``): a backward group's requests as one sequence of their
tokens compute what the padded micro-batches compute (keys, gradients, statistics, weights,
report) on float64 models, in every mode of a turn; the layout and the attention per request;
the probe that decides ``pack="auto"``; the option validates."""
import pytest
import torch

from _same_turns import assert_same, fact_requests, recording
from conftest import ue_tiny_model
from ultraedit import EditConfig, UltraEditor
from ultraedit.packing import (PACKED_ATTENTION, PackedLayout, _Reorder, packed, probe,
                               sliding_window)
from ultraedit.tokenization import encode_edit_batch

MODULES = {"llama": ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.up_proj"],
           "gpt2": ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_proj"]}
pytestmark = pytest.mark.filterwarnings("ignore:edit requests carry subjects",
                                        "ignore:prompt .* targets in one turn")


def _pair(kind, tok, **kw):
    """Two float64 editors on equal sdpa models: padded micro-batches, and packed."""
    eds = []
    for pack in ("off", "on"):
        model = ue_tiny_model(kind, len(tok), seed=3, attn="sdpa").double()
        eds.append(UltraEditor(model, tok, modules=MODULES[kind], lr=1e-3, pack=pack, **kw))
    return eds


def _assert_same(ref, packed_ed, turns):
    rows_ref, rows_packed = recording(ref), recording(packed_ed)
    reports = [(ref.edit(reqs), packed_ed.edit(reqs)) for reqs in turns]
    assert_same(ref, packed_ed, rows_ref, rows_packed, reports)
    assert all(not r1.packed and r2.packed for r1, r2 in reports)
    return reports


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("group", [1, 2, 100])
def test_packed_turns_equal_padded_turns(kind, group, ue_tokenizer):
    """Micro-batches of 3 run by length, one packed forward per backward group of 1, 2 or all
    micro-batches (a shorter last group too)."""
    ref, packed_ed = _pair(kind, ue_tokenizer, micro_batch=3, backward_group=group)
    _assert_same(ref, packed_ed, [fact_requests(11), fact_requests(7, offset=3)])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_steps_hold_done_and_subject_positions(kind, ue_tokenizer):
    """Several steps, held requests skipped between re-checks, subject positions."""
    kw = dict(positions="subject", steps=3, hold_done=True, memory=2.0, protect_mean=0.5,
              micro_batch=2, backward_group=3, recheck=2)
    ref, packed_ed = _pair(kind, ue_tokenizer, **kw)
    reports = _assert_same(ref, packed_ed, [fact_requests(9), fact_requests(6, offset=2)])
    assert sum(r.steps_run for r, _ in reports) > 2


def test_official_statistics_per_micro_batch(ue_tokenizer):
    ref, packed_ed = _pair("gpt2", ue_tokenizer, compat="official", micro_batch=3,
                           backward_group=10)
    _assert_same(ref, packed_ed, [fact_requests(13)])


def test_weighted_forwards_of_auto(ue_tokenizer):
    """micro_batch='auto' with forwards of 4: the paper's groups of 10 straddle the forwards."""
    ref, packed_ed = _pair("llama", ue_tokenizer, micro_batch="auto", backward_group=3)
    for ed in (ref, packed_ed):
        ed.sizer = lambda tok, reqs: 4
    _assert_same(ref, packed_ed, [fact_requests(23)])


def test_layout_packs_real_tokens_row_by_row(ue_padded_tokenizer):
    prompts = ["a b c d e f", "a", "b c d", "e f", "a b"]
    targets = ["x y", "z", "w", "x y z", "q"]
    batches = [encode_edit_batch(ue_padded_tokenizer, prompts[:3], targets[:3]),
               encode_edit_batch(ue_padded_tokenizer, prompts[3:], targets[3:])]
    layout = PackedLayout(batches)
    real = [b["attention_mask"].bool() for b in batches]
    want = torch.cat([b["input_ids"][r] for b, r in zip(batches, real)])
    assert torch.equal(layout.input_ids[0], want)
    assert layout.lengths == torch.cat([r.sum(1) for r in real]).tolist()
    assert torch.equal(layout.position_ids[0],
                       torch.cat([torch.arange(n) for n in layout.lengths]))
    # regrouped by length, longest first, each run's tokens contiguous, and restored exactly
    assert torch.equal(layout.order[layout.restore], torch.arange(layout.tokens))
    assert sum(n * count for n, count in layout.blocks) == layout.tokens
    assert [n for n, _ in layout.blocks] == sorted({*layout.lengths}, reverse=True)
    left = dict(batches[0], attention_mask=batches[0]["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="right-padded"):
        PackedLayout([left])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_logits_equal_padded_logits(kind, ue_padded_tokenizer):
    """The packed forward of odd-length requests gives each request its padded forward's logits
    (float64), and the model's attention implementation is restored afterwards."""
    model = ue_tiny_model(kind, len(ue_padded_tokenizer), seed=7, attn="sdpa").double()
    batch = encode_edit_batch(ue_padded_tokenizer, ["a b c d e f g", "a", "b c d", "e f"],
                              ["x y", "z", "w", "x y z"])
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        layout = PackedLayout([batch])
        with packed(model, layout):
            out = model(input_ids=layout.input_ids, position_ids=layout.position_ids).logits
    torch.testing.assert_close(out[0], layout.pack([padded])[0], rtol=1e-10, atol=1e-12)
    assert layout.calls == model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"


def test_attention_restored_when_the_forward_fails(ue_padded_tokenizer):
    model = ue_tiny_model("llama", len(ue_padded_tokenizer), attn="sdpa")
    batch = encode_edit_batch(ue_padded_tokenizer, ["a b"], ["c"])
    layout = PackedLayout([batch])

    def fail(module, args):
        assert model.config._attn_implementation == PACKED_ATTENTION
        raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"), packed(model, layout):
            model(input_ids=layout.input_ids, position_ids=layout.position_ids)
    finally:
        handle.remove()
    assert model.config._attn_implementation == "sdpa"


def test_probe_decides_auto(ue_tokenizer):
    """'auto' packs an sdpa model on the CPU and not an eager one; 'on' refuses the eager one
    before any weight changes; a model with a sliding window packs requests that fit in it."""
    import transformers as tf

    sdpa = UltraEditor(ue_tiny_model("llama", len(ue_tokenizer), attn="sdpa"), ue_tokenizer,
                       modules=MODULES["llama"])
    assert sdpa.edit(fact_requests(3)).packed
    eager = UltraEditor(ue_tiny_model("llama", len(ue_tokenizer)), ue_tokenizer,
                        modules=MODULES["llama"])
    assert not eager.edit(fact_requests(3)).packed
    assert "eager" in probe(eager.model)
    on = UltraEditor(ue_tiny_model("llama", len(ue_tokenizer)), ue_tokenizer,
                     modules=MODULES["llama"], pack="on")
    before = {n: m.weight.detach().clone() for n, m in on.modules.items()}
    with pytest.raises(ValueError, match="pack='on'.*'sdpa'"):
        on.edit(fact_requests(3))
    assert all(torch.equal(m.weight, before[n]) for n, m in on.modules.items())
    assert on.turns == 0
    cfg = tf.MistralConfig(vocab_size=len(ue_tokenizer), hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=6)
    mistral = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    assert probe(mistral) is None and sliding_window(mistral) == 6
    ed = UltraEditor(mistral, ue_tokenizer, modules=["model.layers.1.mlp.down_proj"], pack="on",
                     lr=1e-2)
    assert ed.edit([("a b", "c")]).packed                     # within the window: packed
    with pytest.raises(ValueError, match="longer than its sliding window"):
        ed.edit([("a b c d e f g h", "x y")])


def test_pack_validates():
    assert EditConfig().pack == "auto"
    with pytest.raises(ValueError, match="pack must be"):
        EditConfig(pack="yes")


def test_teacher_forced_predictions_packed_equal_padded(ue_tokenizer, monkeypatch):
    """Evaluation batches run packed on the CPU (an sdpa model) and predict what padded ones do."""
    import ultraedit.eval.probing as probing
    from _same_turns import FACTS

    model = ue_tiny_model("llama", len(ue_tokenizer), seed=11, attn="sdpa").double()
    prompts, targets = [p for p, _, _ in FACTS], [t for _, t, _ in FACTS]
    calls = []
    real_packed = probing.packed

    def counted(*args):
        calls.append(1)
        return real_packed(*args)

    monkeypatch.setattr(probing, "packed", counted)
    got = probing._teacher_forced(model, ue_tokenizer, prompts, targets, batch_size=3)
    assert len(calls) == 3                     # 8 pairs in batches of 3, each packed
    monkeypatch.setattr(probing, "on_cpu", lambda m: False)
    want = probing._teacher_forced(model, ue_tokenizer, prompts, targets, batch_size=3)
    assert got == want and len(calls) == 3


@pytest.mark.parametrize("dim", [0, 1])
def test_reorder_is_index_select_with_the_inverse_gather_as_backward(dim):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(x.shape[dim], generator=gen)
    restore = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    dy = torch.randn(x.index_select(dim, order).shape, generator=gen, dtype=torch.float64)
    y = _Reorder.apply(x, order, restore, dim)
    assert torch.equal(y, x.index_select(dim, order))
    (got,) = torch.autograd.grad(y, x, dy)
    (want,) = torch.autograd.grad(x.index_select(dim, order), x, dy)
    assert torch.equal(got, want)           # a permutation: every row is written once


@pytest.mark.parametrize("where,settings,group,packs", [
    ("cpu", {}, 4, True),                           # the CPU: grouped and packed
    ("cuda", {}, 4, True),                          # CUDA: grouped because the turn packs
    ("cuda", {"pack": "off"}, 1, False),            # a padded group measured no faster there
    ("cuda", {"backward_group": 1}, 1, False),      # one micro-batch packed alone: not measured
    ("cuda", {"backward_group": 2, "pack": "on"}, 2, True),
    (None, {}, 1, False),                           # spread over devices: the paper's loop
])
def test_auto_layout_by_device(where, settings, group, packs, ue_tokenizer, monkeypatch):
    """backward_group='auto' and pack='auto' by where the model's parameters are (the device
    type is stubbed: the turn itself runs on the CPU)."""
    import ultraedit.batching as batching

    monkeypatch.setattr(batching, "device_type", lambda model: where)
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=3, attn="sdpa").double()
    editor = UltraEditor(model, ue_tokenizer, modules=MODULES["llama"], lr=1e-3, micro_batch=3,
                         **settings)
    report = editor.edit(fact_requests(11))
    assert (report.backward_group, report.packed) == (group, packs)

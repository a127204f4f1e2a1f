"""``micro_batch="auto"``: bigger forwards with the paper's per-10-request losses compute what
the 10-request path computes (keys, gradients, statistics, weights, report) on float64 models;
the size is the largest the memory budget fits; the option parses and validates."""
import warnings

import pytest
import torch

from _same_turns import assert_same, fact_requests, recording
from conftest import ue_tiny_model
from ultraedit import EditConfig, UltraEditor
from ultraedit.batching import MicroBatchSizer, memory_budget, weighted_forward_backward
from ultraedit.plan import request_shape
from ultraedit.tokenization import encode_edit_batch

MODULES = {"llama": ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.up_proj"],
           "gpt2": ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_proj"]}
pytestmark = pytest.mark.filterwarnings("ignore:edit requests carry subjects",
                                        "ignore:prompt .* targets in one turn")
_requests, _recording = fact_requests, recording


def _pair(kind, tok, **kw):
    """Two float64 editors on equal models: the paper's 10 requests per forward, and 'auto'.
    With sdpa attention: transformers' eager attention takes its softmax in float32, so a
    request padded to another length differs there by ~1e-9 even in float64."""
    eds = []
    for mb in (10, "auto"):
        model = ue_tiny_model(kind, len(tok), seed=3).double()
        model.set_attn_implementation("sdpa")
        eds.append(UltraEditor(model, tok, modules=MODULES[kind], lr=1e-3, micro_batch=mb, **kw))
    return eds


_assert_same = assert_same


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("n", [23, 37])
def test_auto_equals_the_ten_request_path(kind, n, ue_tokenizer):
    ref, auto = _pair(kind, ue_tokenizer)
    rows_ref, rows_auto = _recording(ref), _recording(auto)
    reports = []
    for turn in range(2):
        reqs = _requests(n)[turn:]
        reports.append((ref.edit(reqs), auto.edit(reqs)))
    assert [r.micro_batch for _, r in reports] == [n, n - 1]   # the whole turn fits
    assert [r.micro_batch for r, _ in reports] == [10, 10]
    _assert_same(ref, auto, rows_ref, rows_auto, reports)


@pytest.mark.parametrize("size", [1, 7, 20])
def test_any_forward_size_keeps_the_paper_groups(size, ue_tokenizer):
    """Groups of 10 that straddle two forwards (7) or span several (1) are weighted exactly."""
    ref, auto = _pair("llama", ue_tokenizer)
    auto.sizer = lambda tok, reqs: size
    rows_ref, rows_auto = _recording(ref), _recording(auto)
    reports = [(ref.edit(_requests(26)), auto.edit(_requests(26)))]
    assert reports[0][1].micro_batch == size
    _assert_same(ref, auto, rows_ref, rows_auto, reports)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_steps_hold_done_and_subject_positions(kind, ue_tokenizer):
    kw = dict(positions="subject", steps=3, hold_done=True, memory=2.0, protect_mean=0.5)
    ref, auto = _pair(kind, ue_tokenizer, **kw)
    rows_ref, rows_auto = _recording(ref), _recording(auto)
    reports = [(ref.edit(_requests(n)), auto.edit(_requests(n))) for n in (13, 21)]
    assert sum(r.steps_run for r, _ in reports) > 2
    _assert_same(ref, auto, rows_ref, rows_auto, reports)


def test_official_keeps_its_groups(ue_tokenizer):
    """compat='official': length-sorted groups of 10, statistics merged group by group."""
    ref, auto = _pair("gpt2", ue_tokenizer, compat="official")
    assert auto.sizer.candidates(25) == [25, 20, 10]
    rows_ref, rows_auto = _recording(ref), _recording(auto)
    reports = [(ref.edit(_requests(n)), auto.edit(_requests(n))) for n in (25, 17)]
    assert reports[0][1].micro_batch == 25
    _assert_same(ref, auto, rows_ref, rows_auto, reports)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_one_group_gives_the_paper_loss_and_predictions(kind, ue_tokenizer):
    """One group in one forward: the weighted loss (logits at the answer rows only) is the
    mean cross-entropy, and the requests predicted are those of the full logits."""
    from ultraedit.turn import loss_weights

    model = ue_tiny_model(kind, len(ue_tokenizer), seed=1).double()
    reqs = _requests(6)
    batch = encode_edit_batch(ue_tokenizer, [r["prompt"] for r in reqs],
                              [r["target"] for r in reqs])
    labels = batch["labels"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mean = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                             ignore_index=-100)
    labels[2] = torch.where(labels[2] != -100, logits[2].argmax(-1), labels[2])  # one holds
    mean_after = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                   ignore_index=-100)
    loss_weights([batch], 10)
    loss, predicted = weighted_forward_backward(model, batch)
    torch.testing.assert_close(loss, mean_after, rtol=1e-12, atol=0)
    assert predicted.tolist() == [i == 2 for i in range(6)]
    assert not torch.equal(mean, mean_after)


def test_the_size_is_the_largest_that_fits(ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer)).double()
    reqs = _requests(45)
    ed = UltraEditor(model, ue_tokenizer, modules=MODULES["llama"], micro_batch="auto",
                     memory_budget_gib=64)
    sizer = ed.sizer
    assert sizer.candidates(45) == [45, 40, 30, 20, 10, 5, 2, 1]
    assert sizer(ue_tokenizer, reqs) == 45 and sizer.last_plan.fits
    # a budget between the plans of 20 and 30 requests per forward picks 20
    from ultraedit.plan import request_lengths

    lengths = request_lengths(ue_tokenizer, reqs)
    plans = {size: sizer.plan(reqs, lengths, size, 1 << 40).total_bytes for size in (20, 30)}
    assert plans[20] < plans[30]
    ed.config = ed.config.replace(memory_budget_gib=(plans[20] + plans[30]) / 2 / 2**30)
    assert sizer(ue_tokenizer, reqs) == 20
    assert ed.edit(reqs).micro_batch == 20
    # nothing fits: the smallest size, with a warning that says why
    ed.config = ed.config.replace(memory_budget_gib=1e-6)
    with pytest.warns(UserWarning, match="predicted not to fit"):
        assert sizer(ue_tokenizer, reqs) == 1


def test_default_budget_is_weights_plus_free_memory(ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = memory_budget(model, EditConfig(micro_batch="auto"))
    assert budget > weights
    assert memory_budget(model, EditConfig(micro_batch="auto", memory_budget_gib=2)) == 2 << 30


def test_request_shape_is_what_the_encoding_gives(ue_tokenizer):
    """request_shape describes the micro-batches the editor runs (forwards by length included)."""
    from ultraedit.turn import prepare_turn

    reqs = _requests(13)
    for size in (1, 4, 13):
        shape = request_shape(ue_tokenizer, reqs, size)
        _, batches = prepare_turn(ue_tokenizer, reqs, EditConfig(micro_batch=size),
                                  torch.device("cpu"), None)
        answer, seq, cols = 0, 0, 0
        for b in batches:
            mask = b["labels"] != -100
            answer, seq = answer + int(mask.sum()), max(seq, mask.shape[1])
            # answer rows per request: only those rows are projected to the vocabulary
            cols = max(cols, -(-int(mask.sum()) // mask.shape[0]))
        assert shape == {"answer_tokens": answer / 13, "seq_len": seq, "logit_columns": cols}


def test_config_and_command_line():
    assert EditConfig(micro_batch="auto").micro_batch == "auto"
    cfg = EditConfig(micro_batch="auto", memory_budget_gib=12)
    assert EditConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ("big", 0, 2.5, True):
        with pytest.raises(ValueError, match="micro_batch must be a positive integer or 'auto'"):
            EditConfig(micro_batch=bad)
    with pytest.raises(ValueError, match="memory_budget_gib"):
        EditConfig(micro_batch="auto", memory_budget_gib=-1)
    with pytest.warns(UserWarning, match="no effect unless micro_batch='auto'"):
        EditConfig(memory_budget_gib=8)

    from ultraedit.cli import build_parser
    from ultraedit.cli.options import given_options

    parser = build_parser()
    args = parser.parse_args(["run", "--micro-batch", "auto", "--memory-budget-gib", "6"])
    assert given_options(args) == {"micro_batch": "auto", "memory_budget_gib": 6.0}
    assert given_options(parser.parse_args(["run", "--micro-batch", "20"])) == {"micro_batch": 20}
    with pytest.raises(SystemExit):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parser.parse_args(["run", "--micro-batch", "many"])


def test_a_model_the_plan_cannot_read_falls_back_to_ten(ue_tokenizer, monkeypatch):
    import ultraedit.plan as plan

    model = ue_tiny_model("llama", len(ue_tokenizer))
    ed = UltraEditor(model, ue_tokenizer, modules=MODULES["llama"], micro_batch="auto")

    def broken(*a, **k):
        raise ValueError("unknown architecture")

    monkeypatch.setattr(plan, "plan_turn", broken)
    with pytest.warns(UserWarning, match="cannot predict this model's memory"):
        assert ed.edit(_requests(23)).micro_batch == 10
    assert isinstance(ed.sizer, MicroBatchSizer) and ed.sizer.last_plan is None


def test_the_lifelong_loop_runs_an_auto_editor(ue_tokenizer):
    from ultraedit.data import offline_facts
    from ultraedit.eval import lifelong_run

    records = offline_facts(("capital",), seed=0, limit=12, n_locality=1, n_paraphrases=1)
    model = ue_tiny_model("llama", len(ue_tokenizer))
    ed = UltraEditor(model, ue_tokenizer, modules=MODULES["llama"], micro_batch="auto")
    out = lifelong_run(model, ue_tokenizer, records, ed, turns=2, edits_per_turn=6,
                       eval_end=False, progress=False)
    assert out["status"] == "done" and [t["edits"] for t in out["turns"]] == [6, 6]
    assert [t["micro_batch"] for t in out["turns"]] == [6, 6]


def test_bf16_weights_agree_with_the_ten_request_path_to_rounding(ue_tokenizer):
    """bf16: the two paths round differently (other padded lengths and reduction orders), so
    the accumulated fp32 deltas agree to bf16 precision, not bit for bit."""
    eds = []
    for mb in (10, "auto"):
        model = ue_tiny_model("llama", len(ue_tokenizer), seed=3).to(torch.bfloat16)
        eds.append(UltraEditor(model, ue_tokenizer, modules=MODULES["llama"], lr=1e-2,
                               micro_batch=mb))
    reports = [ed.edit(_requests(24)) for ed in eds]
    assert [r.micro_batch for r in reports] == [10, 24]
    for n in eds[0].modules:
        d10, dauto = (ed.journal.current_delta(n).float() for ed in eds)
        assert d10.abs().max() > 0
        assert (dauto - d10).norm() <= 0.05 * d10.norm()


@pytest.mark.parametrize("positions", ["answer", "subject"])
def test_held_requests(positions, ue_tokenizer):
    """hold_done with requests the model already predicts (a bias on one word's logit): the
    held rows, the early end and every number agree with the 10-request path."""
    from test_editor_hold_positions import force_prediction

    ref, auto = _pair("llama", ue_tokenizer, steps=3, hold_done=True, positions=positions)
    word = {force_prediction(ed.model, ue_tokenizer) for ed in (ref, auto)}.pop()
    reqs = [dict(r, target=word) if i % 3 == 0 else r for i, r in enumerate(_requests(23))]
    rows_ref, rows_auto = _recording(ref), _recording(auto)
    reports = [(ref.edit(reqs), auto.edit(reqs))]
    assert reports[0][0].n_predicted == 8 and reports[0][1].micro_batch == 23
    _assert_same(ref, auto, rows_ref, rows_auto, reports)


def test_predicted_with_a_margin():
    """A request is predicted when every answer row's target wins (argmax), or with a margin
    when it leads every other logit by at least that much."""
    from ultraedit.batching import _predicted

    rows = torch.tensor([[2.0, 1.5, 0.0],     # request 0: target 0 leads by 0.5
                         [0.0, 3.0, 0.5],     # request 1: target 1 leads by 2.5
                         [0.0, 0.0, 1.0]])    # request 1: target 2 leads by 1.0
    target = torch.tensor([0, 1, 2])
    mask = torch.tensor([[True, False], [True, True]])
    assert _predicted(rows, target, mask).tolist() == [True, True]
    assert _predicted(rows, target, mask, 0.5).tolist() == [True, True]
    assert _predicted(rows, target, mask, 0.75).tolist() == [False, True]
    assert _predicted(rows, target, mask, 1.5).tolist() == [False, False]


def test_backward_by_batch_gives_each_batch_its_paper_loss():
    """One cross-entropy over the answer rows of three micro-batches of odd sizes: each batch's
    loss is its mean cross-entropy, the rows' gradient that of the sum, and the predictions the
    argmax's (against the float64 per-batch formula)."""
    from ultraedit.batching import backward_by_batch

    g = torch.Generator().manual_seed(0)
    batches, masks = [], []
    for b, length in ((3, 7), (2, 5), (4, 9)):
        labels = torch.randint(0, 37, (b, length), generator=g)
        labels[:, : length // 2] = -100
        labels[0, -1] = -100
        batches.append({"labels": labels})
        masks.append(labels != -100)
    n = sum(int(m.sum()) for m in masks)
    rows = torch.randn(n, 37, dtype=torch.float64, generator=g, requires_grad=True)
    results = backward_by_batch(rows, batches, masks)

    ref_rows = rows.detach().clone().requires_grad_()
    ref = [torch.nn.functional.cross_entropy(part, batch["labels"][mask])
           for part, batch, mask in zip(ref_rows.split([int(m.sum()) for m in masks]),
                                        batches, masks)]
    sum(ref).backward()
    for (loss, predicted), want, part, batch, mask in zip(
            results, ref, ref_rows.detach().split([int(m.sum()) for m in masks]), batches, masks):
        torch.testing.assert_close(loss, want.detach(), rtol=1e-13, atol=0)
        wrong = (part.argmax(-1) != batch["labels"][mask]).double()
        owner = mask.nonzero()[:, 0]
        assert predicted.tolist() == (torch.zeros(mask.shape[0], dtype=torch.float64)
                                      .index_add_(0, owner, wrong) == 0).tolist()
    torch.testing.assert_close(rows.grad, ref_rows.grad, rtol=1e-13, atol=0)


def test_answer_logits_is_a_view_of_the_projection(ue_tokenizer):
    """The answer rows come out of the projection as a view (no select, whose backward would
    write the gradient into zeros of the whole projection)."""
    from ultraedit.batching import answer_logits

    model = ue_tiny_model("llama", len(ue_tokenizer), seed=1)
    reqs = _requests(3)
    batch = encode_edit_batch(ue_tokenizer, [r["prompt"] for r in reqs],
                              [r["target"] for r in reqs])
    mask = batch["labels"] != -100
    with torch.enable_grad():
        rows = answer_logits(model, batch, mask)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert type(rows.grad_fn).__name__.startswith("SqueezeBackward")
    torch.testing.assert_close(rows, full[mask], rtol=1e-5, atol=1e-5)

"""Evaluation (ultraedit.eval) on tiny random-init models and a deterministic bigram 'LM' (tests/conftest.py)."""

import math

import pytest
import torch

pytest.importorskip("transformers")

from conftest import data_bigram_lm, ue_tiny_model  # noqa: E402
from ultraedit import eval as M  # noqa: E402
from ultraedit.data import EditRecord  # noqa: E402
from ultraedit.tokenization import encode_edit_batch, encode_request, special_prefix  # noqa: E402

PROMPTS = ["The capital of France is", "Paris is in", "The currency of Japan is the",
           "The official language of Peru is"]
TARGETS = ["Paris", "France and Germany", "yen", "Spanish"]


@pytest.fixture(scope="module")
def tiny(ue_tokenizer):
    return ue_tiny_model("llama", len(ue_tokenizer), seed=1), ue_tokenizer


def _direct_accuracy(model, tok, prompt, target):
    b = encode_edit_batch(tok, [prompt], [target])
    m = b["labels"] != -100
    with torch.no_grad():
        pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
    return (pred[m] == b["labels"][m]).double().mean().item()


def test_token_accuracy_matches_direct_computation_and_is_batch_invariant(tiny):
    model, tok = tiny
    expected = [_direct_accuracy(model, tok, p, t) for p, t in zip(PROMPTS, TARGETS)]
    for bs in (1, 3, 32):
        got = M.token_accuracy(model, tok, PROMPTS, TARGETS, batch_size=bs)
        assert got == pytest.approx(expected, abs=1e-9)
    assert M.token_accuracy(model, tok, [], []) == []
    with pytest.raises(ValueError):
        M.token_accuracy(model, tok, PROMPTS, TARGETS[:2])


def test_token_accuracy_counts_fraction_of_target_tokens(ue_tokenizer):
    tok = ue_tokenizer
    model = data_bigram_lm(tok, [("The capital of France is", "Paris"), ("Berlin in", "Germany")])
    long_ids = encode_request(tok, "Berlin in", "Germany and Italy")[1]
    short_ids = encode_request(tok, "Berlin in", "Germany")[1]
    assert long_ids[:len(short_ids)] == short_ids and len(long_ids) > len(short_ids)
    n, k = len(long_ids), len(short_ids)
    acc = M.token_accuracy(model, tok, ["The capital of France is", "Berlin in", "Berlin in"],
                           ["Paris", "Germany and Italy", "Rome"])
    assert acc[0] == 1.0
    assert acc[1] == pytest.approx(k / n)                # only " Germany" is predicted
    assert acc[2] == 0.0


def test_eval_mode_restored(tiny):
    model, tok = tiny
    model.train()
    M.token_accuracy(model, tok, PROMPTS[:1], TARGETS[:1])
    assert model.training
    model.eval()


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_continuations_match_uncached_decoding(ue_tokenizer, kind, compact, monkeypatch):
    """Rows that have their tokens leave the batch (their KV-cache rows dropped), or, with a
    cache that cannot be cut, stay computed and are ignored: the same tokens either way."""
    import ultraedit.eval.probing as probing

    if not compact:
        monkeypatch.setattr(probing, "_select_rows", lambda cache, keep: None)
    tok = ue_tokenizer
    model = ue_tiny_model(kind, len(tok), seed=2)
    prefix = special_prefix(tok)
    rows = [encode_request(tok, p, "x", prefix)[0] for p in PROMPTS]
    lengths = [4, 1, 3, 0]
    got = M.greedy_continuations(model, tok, rows, lengths, batch_size=3)
    assert M.greedy_continuations(model, tok, rows, lengths, batch_size=1) == got
    assert M.greedy_continuations(model, tok, rows, lengths, batch_size=4) == got
    for row, n, g in zip(rows, lengths, got):
        cur, expected = list(row), []
        with torch.no_grad():
            for _ in range(n):
                nxt = int(model(torch.tensor([cur])).logits[0, -1].argmax())
                expected.append(nxt)
                cur.append(nxt)
        assert g == expected


def test_next_token_predictions(tiny):
    model, tok = tiny
    free = M.next_token_predictions(model, tok, PROMPTS[:2])
    prefix = special_prefix(tok)
    for p, f in zip(PROMPTS[:2], free):
        ids = torch.tensor([encode_request(tok, p, "x", prefix)[0]])
        with torch.no_grad():
            assert f == [int(model(ids).logits[0, -1].argmax())]
    forced = M.next_token_predictions(model, tok, PROMPTS[:2], [TARGETS[0], None])
    assert len(forced[0]) == len(encode_request(tok, PROMPTS[0], TARGETS[0], prefix)[1])
    assert forced[1] == free[1]


def test_generation_scores_exact_and_prefix(ue_tokenizer):
    tok = ue_tokenizer
    model = data_bigram_lm(tok, [("The capital of France is", "Paris"), ("Berlin in", "Germany")])
    long_ids = encode_request(tok, "Berlin in", "Germany and Italy")[1]
    n, k = len(long_ids), len(encode_request(tok, "Berlin in", "Germany")[1])
    scores = M.generation_scores(model, tok, ["The capital of France is", "Berlin in",
                                              "Berlin in"], ["Paris", "Germany and Italy", "Rome"])
    assert scores[0] == (1.0, 1.0)
    assert scores[1] == (0.0, pytest.approx(k / n))
    assert scores[2] == (0.0, 0.0)


def test_ngram_entropy_values():
    # tokens a b a b: bigrams {ab: 2, ba: 1}, trigrams {aba: 1, bab: 1}
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert M.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert M.ngram_entropy("word") == 0.0
    varied = "the quick brown fox jumps over the lazy dog while a cat sleeps"
    assert M.ngram_entropy("the the the the the the the the") < M.ngram_entropy(varied)


def test_fluency_is_finite_and_nonnegative(tiny):
    model, tok = tiny
    value = M.fluency(model, tok, ["The capital of", "Paris"], max_new_tokens=8)
    assert 0.0 <= value < 10.0
    with pytest.raises(ValueError):
        M.fluency(model, tok, [])


def _records():
    return [
        EditRecord("The capital of France is", "Rome", paraphrases=["France's capital is"],
                   locality=[("The capital of Spain is", "Madrid"), ("Paris is in", None)],
                   portability=[("Lyon is in a country whose capital is", "Rome")]),
        EditRecord("The capital of Italy is", "Paris",
                   locality=[("The capital of Spain is", "Madrid"), ("The currency of", None)]),
    ]


def test_evaluate_records_locality_against_unedited_model(tiny):
    model, tok = tiny
    records = _records()
    ref = M.locality_reference(model, tok, records, generation=True)
    assert len(ref) == 3
    assert len(ref.gold[("Paris is in", None)]) == M.FREE_LOCALITY_TOKENS
    same = M.evaluate_records(model, tok, records, locality_reference=ref, generation=True,
                              fluency_prompts=["The capital of"])
    assert same["n"] == 2 and same["ls_source"] == "unedited"
    assert same["ls"] == 1.0 and same["gen_ls"] == 1.0 and same["gen_ls_prefix"] == 1.0
    for key in ("es", "gs", "pt", "ls_data", "gen_es", "gen_gs", "gen_pt", "gen_es_prefix",
                "gen_gs_prefix", "gen_pt_prefix", "fluency"):
        assert 0.0 <= same[key] <= 10.0, key
    expected_es = sum(M.token_accuracy(model, tok, [r.prompt for r in records],
                                       [r.target for r in records])) / 2
    assert same["es"] == pytest.approx(expected_es)
    # perturb the model: locality against the unedited predictions drops
    edited = ue_tiny_model("llama", len(tok), seed=1)
    with torch.no_grad():
        edited.lm_head.weight.add_(torch.randn_like(edited.lm_head.weight) * 5)
    after = M.evaluate_records(edited, tok, records, locality_reference=ref)
    assert after["ls"] < 1.0
    assert "gen_es" not in after
    no_pt = M.evaluate_records(edited, tok, records, locality_reference=ref, portability=False)
    assert no_pt["pt"] is None and no_pt["es"] == after["es"] and no_pt["ls"] == after["ls"]


def test_evaluate_records_without_reference_uses_answers(ue_tokenizer):
    tok = ue_tokenizer
    model = data_bigram_lm(tok, [("The capital of France is", "Rome")])  # "... is" -> " Rome"
    records = [EditRecord("The capital of France is", "Rome", paraphrases=["France's capital is"],
                          locality=[("The capital of Spain is", "Madrid"), ("Hello", None)])]
    out = M.evaluate_records(model, tok, records, generation=True, fluency_prompts=["Hi"])
    assert out["es"] == 1.0 and out["gs"] == 1.0 and out["gen_es"] == 1.0
    assert out["ls"] == out["ls_data"] < 0.5 and out["ls_source"] == "answers"
    assert out["pt"] is None
    assert M.evaluate_records(model, tok, [])["es"] is None


def test_missing_reference_key_raises(tiny):
    model, tok = tiny
    records = _records()
    ref = M.locality_reference(model, tok, records[:1])
    with pytest.raises(KeyError, match="locality_reference"):
        M.evaluate_records(model, tok, records, locality_reference=ref)
    M.locality_reference(model, tok, records, reference=ref)     # extend in place
    assert M.evaluate_records(model, tok, records, locality_reference=ref)["ls"] == 1.0


@pytest.mark.parametrize("generation", [False, True])
def test_progress_counts_every_prompt_batch_by_batch(tiny, generation):
    """The progress callback sees every batch of the reference and of the evaluation, and adds
    up to what locality_work/evaluation_work announce; the scores do not change."""
    from ultraedit.eval.locality import locality_work

    model, tok = tiny
    records = _records()
    calls = []
    ref = M.locality_reference(model, tok, records, generation=generation, batch_size=1,
                               progress=calls.append)
    assert calls and all(n == 1 for n in calls)
    assert sum(calls) == locality_work(records, generation) > 0
    calls.clear()
    kwargs = dict(locality_reference=ref, generation=generation, batch_size=2,
                  fluency_prompts=["The capital of", "Paris"])
    out = M.evaluate_records(model, tok, records, progress=calls.append, **kwargs)
    assert sum(calls) == M.evaluation_work(records, ref, generation, ["The capital of", "Paris"])
    assert len(calls) > 3 and max(calls) <= 2
    assert out == M.evaluate_records(model, tok, records, **kwargs)


def test_next_token_predictions_reports_progress(tiny):
    """With and without targets, every prompt is counted once; the predictions do not change."""
    model, tok = tiny
    prompts = ["The capital of France is", "Paris is in", "The sky is"]
    targets = [" Paris", None, " blue"]
    calls = []
    got = M.next_token_predictions(model, tok, prompts, targets, batch_size=1,
                                   progress=calls.append)
    assert sum(calls) == len(prompts)
    assert got == M.next_token_predictions(model, tok, prompts, targets)

"""WILD-style scores (ultraedit.eval.wild): stop strings, the token limit, normalization, locality
against the unedited answers, batching. On a scripted 'LM' that knows its exact answers (the
bigram 'LM' of tests/conftest.py cannot: on the tiny tokenizer's short pieces, such as a lone
space, its bigrams clash) and on tiny random-init models."""

import pytest
import torch

pytest.importorskip("transformers")

from conftest import ue_tiny_model  # noqa: E402
from ultraedit import eval as M  # noqa: E402
from ultraedit.data import EditRecord  # noqa: E402
from ultraedit.eval import wild as W  # noqa: E402
from ultraedit.eval.wild import _cut  # noqa: E402
from ultraedit.tokenization import encode_request  # noqa: E402


@pytest.mark.parametrize("text, expected", [
    ("The  Japanese Yen!", "japanese yen"),
    ("  an Apple a day ", "apple day"),
    ("Washington, D.C.", "washington dc"),
    ("Theatre", "theatre"),                    # articles only as whole words
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert M.normalize_answer(text) == expected


def test_exact_and_contains():
    assert M.answer_exact("the Euro.", "euro") and not M.answer_exact("the Japanese yen", "yen")
    assert M.answer_contains("the Japanese yen", "yen")
    assert M.answer_contains("Paris, France", "paris")
    assert not M.answer_contains("Romeo", "Rome")             # whole words only
    assert not M.answer_contains("", "Rome")
    assert M.answer_contains("", "The") and not M.answer_contains("x", "The")


def test_wild_prompt_asks_the_records_question():
    q = {"The capital of France is": "What is the capital of France?"}
    assert M.wild_prompt("The capital of France is", q) == \
        "Q: What is the capital of France?\nA:"
    assert M.wild_prompt("Paris is in", q) == "Paris is in"
    assert M.wild_prompt("Paris is in") == "Paris is in"


def test_cut_at_the_first_stop_string():
    assert _cut(" Paris. It is", (".", "\n")) == " Paris"
    assert _cut(" Paris\nand.", (".", "\n")) == " Paris"
    assert _cut(" Paris", (".", "\n")) is None


class ScriptedLM(torch.nn.Module):
    """A causal 'LM' that continues each scripted prompt with exactly its scripted text (as
    ``encode_request`` tokenizes ``(prompt, text)``), then ``end`` (default: the pad id, which
    decodes to nothing); any other sequence predicts ``end``. Its 'KV cache' is the tokens seen
    so far, so cached decoding works; teacher-forced calls get logits at every position."""

    def __init__(self, tokenizer, script, end=0):
        super().__init__()
        self.seqs = [encode_request(tokenizer, p, t) for p, t in script.items()]
        self.vocab, self.end = len(tokenizer), end
        self.weight = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def _next(self, seen):
        for p, t in self.seqs:
            k = len(seen) - len(p)
            if 0 <= k < len(t) and seen[:len(p)] == p and seen[len(p):] == t[:k]:
                return t[k]
        return self.end

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, **kwargs):
        import types

        B, L = input_ids.shape
        mask = (attention_mask[:, -L:] if attention_mask is not None
                else torch.ones_like(input_ids))
        logits = torch.zeros(B, L, self.vocab)
        seen_all = []
        for b in range(B):
            seen = list(cache[b]) if cache is not None else []
            for t in range(L):
                if mask[b, t]:
                    seen.append(int(input_ids[b, t]))
                logits[b, t, self._next(seen)] = 1.0
            seen_all.append(seen)
        return types.SimpleNamespace(logits=logits, cache=seen_all)


def test_decoding_stops_at_a_period_a_newline_or_eos(ue_tokenizer):
    tok = ue_tokenizer
    model = ScriptedLM(tok, {"The capital of France is": "Paris. It was big",
                             "Berlin in": "Germany\nand more",
                             "Japan uses the": "yen"}, end=tok.eos_token_id)
    prompts = ["The capital of France is", "Berlin in", "Japan uses the"]
    answers, ids = M.decode_answers(model, tok, prompts, return_ids=True)
    assert answers == ["Paris", "Germany", "yen"]
    # a row stops at the token that completes the stop string; EOS is not part of the answer
    assert tok.decode(ids[0]).endswith(".") and tok.decode(ids[1]).endswith("\n")
    assert ids[2][-1] == tok.eos_token_id
    other = ScriptedLM(tok, {"Japan uses the": "yen"}, end=tok.bos_token_id)   # any special token
    assert M.decode_answers(other, tok, ["Japan uses the"], return_ids=True) == \
        (["yen"], [encode_request(tok, "Japan uses the", "yen")[1] + [tok.bos_token_id]])
    assert M.decode_answers(model, tok, prompts[:1], stop_strings=("It",)) == ["Paris."]


def test_decoding_stops_at_max_new_tokens(ue_tokenizer):
    tok = ue_tokenizer
    model = ScriptedLM(tok, {"Berlin": " ".join(["Berlin"] * 60)})
    answers, ids = M.decode_answers(model, tok, ["Berlin"], max_new_tokens=7, return_ids=True)
    assert len(ids[0]) == 7 and answers == [tok.decode(ids[0]).strip()]
    assert answers[0].startswith("Berlin Berlin")
    answers, ids = M.decode_answers(model, tok, ["Berlin"], return_ids=True)
    assert len(ids[0]) == M.MAX_NEW_TOKENS == 50
    with pytest.raises(ValueError, match="max_new_tokens"):
        M.decode_answers(model, tok, ["Berlin"], max_new_tokens=0)
    assert M.decode_answers(model, tok, []) == []


def _one_by_one(model, tok, prompt, max_new, stops):
    """Uncached greedy decoding of one prompt with the same stopping rule."""
    from ultraedit.eval.probing import _prompt_ids
    from ultraedit.tokenization import special_prefix

    cur = _prompt_ids(tok, prompt, special_prefix(tok))
    gen = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([cur])).logits[0, -1].argmax())
            if nxt in tok.all_special_ids:
                return tok.decode(gen, skip_special_tokens=True).strip()
            gen.append(nxt)
            cur.append(nxt)
            cut = _cut(tok.decode(gen, skip_special_tokens=True), stops)
            if cut is not None:
                return cut.strip()
    return tok.decode(gen, skip_special_tokens=True).strip()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_decoding_equals_one_by_one(ue_tokenizer, kind):
    tok = ue_tokenizer
    model = ue_tiny_model(kind, len(tok), seed=3)
    prompts = ["The capital of France is", "Paris is in", "The currency of Japan is the",
               "The official language of Peru is", "Q: What is the capital of Italy?\nA:",
               "Berlin"]
    stops = (".", "\n", "is", "e")          # stop strings a random model does produce
    expected = [_one_by_one(model, tok, p, 12, stops) for p in prompts]
    assert any(len(e) < 12 for e in expected)
    for bs in (1, 4, 32, None):       # None: sized by the KV cache (256 rows here)
        got = M.decode_answers(model, tok, prompts, max_new_tokens=12, stop_strings=stops,
                               batch_size=bs)
        assert got == expected, bs
    with pytest.raises(ValueError, match="batch_size"):
        M.decode_answers(model, tok, prompts, batch_size=0)


def test_decode_batch_size_fills_the_cache_budget(ue_tokenizer, monkeypatch):
    """Rows whose KV cache (2 x layers x kv heads x head dim x element bytes x positions) fits
    DECODE_CACHE_BYTES, within DECODE_ROWS; the smallest without a config to read."""
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=3)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    low, high = W.DECODE_ROWS
    assert W.decode_batch_size(model, 30, 50) == high
    monkeypatch.setattr(W, "DECODE_CACHE_BYTES", per_token * 80 * 100 + 5)
    assert W.decode_batch_size(model, 30, 50) == 100
    monkeypatch.setattr(W, "DECODE_CACHE_BYTES", per_token * 80 * 3)
    assert W.decode_batch_size(model, 30, 50) == low
    model.to(torch.bfloat16)            # half the bytes per position: twice the rows
    monkeypatch.setattr(W, "DECODE_CACHE_BYTES", per_token * 80 * 50)
    assert W.decode_batch_size(model, 30, 50) == 100
    assert W.decode_batch_size(ScriptedLM(ue_tokenizer, {}), 30, 50) == low


def _records(questions=None):
    return [
        EditRecord("The capital of France is", "Rome", paraphrases=["France's capital is"],
                   locality=[("The capital of Spain is", "Madrid"), ("Berlin in", "Germany")],
                   portability=[("Lyon is in a country whose capital is", "Rome")],
                   questions=questions or {}),
        EditRecord("The capital of Italy is", "Paris",
                   locality=[("The capital of Spain is", "Madrid")]),
    ]


def test_scores_of_known_answers(ue_tokenizer):
    tok = ue_tokenizer
    script = {"The capital of France is": "Rome, of course.",
              "France's capital is": "the city of Rome.",
              "The capital of Italy is": "Paris.",
              "The capital of Spain is": "Lisbon.",          # wrong, but the unedited answer
              "Berlin in": "Germany."}
    model = ScriptedLM(tok, script)
    records = _records()
    ref = M.locality_reference(model, tok, records, wild=True)
    assert ref.answers == {"The capital of Spain is": "Lisbon", "Berlin in": "Germany"}
    out = M.wild_evaluation(model, tok, records, ref)
    assert out["n"] == 2
    assert out["wild_es"] == 0.5 and out["wild_es_contains"] == 1.0   # "Rome, of course"
    assert out["wild_gs"] == 0.0 and out["wild_gs_contains"] == 1.0   # "the city of Rome"
    assert out["wild_ls"] == 1.0 and out["wild_ls_source"] == "unedited"
    assert out["wild_examples"][0] == {"prompt": "The capital of France is", "target": "Rome",
                                       "answer": "Rome, of course"}
    # without a reference: locality against the data set's answers
    no_ref = M.wild_evaluation(model, tok, records)
    assert no_ref["wild_ls_source"] == "answers"
    assert no_ref["wild_ls"] == pytest.approx((0.5 + 0.0) / 2)
    # an edit that changes the answer to one locality prompt: only that one counts as changed
    edited = ScriptedLM(tok, {**script, "Berlin in": "Japan."})
    after = M.wild_evaluation(edited, tok, records, ref)
    assert after["wild_ls"] == pytest.approx((0.5 + 1.0) / 2)
    # normalization: an unedited answer that differs only in case/punctuation/articles is the same
    ref.answers["Berlin in"] = "the  japan!"
    assert M.wild_evaluation(edited, tok, records, ref)["wild_ls"] == 1.0


def test_locality_contains_counts_the_facts_the_unedited_model_named(ue_tokenizer):
    """``wild_ls_contains``: of the locality prompts whose unedited answer contains the data
    set's answer, the share whose answer still does; text after the answer may change."""
    tok = ue_tokenizer
    script = {"The capital of France is": "Rome.", "The capital of Italy is": "Paris.",
              "The capital of Spain is": "Madrid, a large city.",
              "Berlin in": "Germany, in the north."}
    records = _records()
    ref = M.locality_reference(ScriptedLM(tok, script), tok, records, wild=True)
    tail = ScriptedLM(tok, {**script, "The capital of Spain is": "Madrid, the seat of a king.",
                            "Berlin in": "Germany, of course."})
    out = M.wild_evaluation(tail, tok, records, ref)
    assert out["wild_ls"] == 0.0 and out["wild_ls_contains"] == 1.0
    lost = ScriptedLM(tok, {**script, "Berlin in": "Japan, of course."})
    out = M.wild_evaluation(lost, tok, records, ref)
    assert out["wild_ls_contains"] == pytest.approx((0.5 + 1.0) / 2)
    # a prompt whose unedited answer did not name the fact does not count
    ref.answers["Berlin in"] = "Austria"
    assert M.wild_evaluation(lost, tok, records, ref)["wild_ls_contains"] == 1.0
    # without a reference: the answer contains the data set's answer
    assert M.wild_evaluation(lost, tok, records)["wild_ls_contains"] == pytest.approx(
        (0.5 + 1.0) / 2)


def test_questions_are_asked_in_the_qa_format(ue_tokenizer):
    tok = ue_tokenizer
    question = "What is the capital of France?"
    qa = M.QA_TEMPLATE.format(question=question)
    model = ScriptedLM(tok, {"The capital of France is": "Paris.", qa: "Rome."})
    records = [EditRecord("The capital of France is", "Rome",
                          questions={"The capital of France is": question})]
    out = M.wild_evaluation(model, tok, records)
    assert out["wild_es"] == 1.0 and out["wild_examples"][0]["prompt"] == qa
    plain = M.wild_evaluation(model, tok, [EditRecord("The capital of France is", "Rome")])
    assert plain["wild_es"] == 0.0 and plain["wild_examples"][0]["answer"] == "Paris"


def test_evaluate_records_reports_wild_beside_the_other_scores(ue_tokenizer):
    tok = ue_tokenizer
    model = ScriptedLM(tok, {"The capital of France is": "Rome.",
                             "The capital of Italy is": "Paris."})
    records = _records()
    ref = M.locality_reference(model, tok, records, wild=True)
    calls = []
    out = M.evaluate_records(model, tok, records, locality_reference=ref, wild=True,
                             batch_size=2, progress=calls.append)
    assert sum(calls) == M.evaluation_work(records, ref, wild=True)
    assert out["es"] == 1.0 and out["wild_es"] == 1.0 and out["wild_ls"] == 1.0
    assert "wild_es" not in M.evaluate_records(model, tok, records, locality_reference=ref)
    bare = M.locality_reference(model, tok, records)
    with pytest.raises(KeyError, match="wild=True"):
        M.evaluate_records(model, tok, records, locality_reference=bare, wild=True)


def test_locality_reference_decodes_each_prompt_once(ue_tokenizer):
    from ultraedit.eval.locality import locality_work

    tok = ue_tokenizer
    model = ScriptedLM(tok, {"The capital of France is": "Rome."})
    records = _records()
    calls = []
    ref = M.locality_reference(model, tok, records, wild=True, batch_size=1,
                               progress=calls.append)
    assert sum(calls) == locality_work(records, wild=True) == 2 + 2
    assert locality_work(records, reference=ref, wild=True) == 0


def _true_fact_records():
    question = "What is the capital of France?"
    return [
        EditRecord("The capital of France is", "Rome", target_true="Paris",
                   paraphrases=["France's capital is", "The French capital is"],
                   locality=[("The capital of Spain is", "Madrid")],
                   portability=[("Lyon is in a country whose capital is", "Rome")],
                   questions={"The capital of France is": question}),
        EditRecord("The capital of Italy is", "Paris"),            # no true answer: left out
    ]


def _true_fact_script():
    return {M.QA_TEMPLATE.format(question="What is the capital of France?"): "Paris.",
            "The capital of France is": "Paris.",
            "France's capital is": "Paris, of course.",
            "The French capital is": "Lyon."}


def test_true_fact_scores_ask_for_the_true_answer(ue_tokenizer):
    tok = ue_tokenizer
    model = ScriptedLM(tok, _true_fact_script())
    records = _true_fact_records()
    calls = []
    out = M.true_fact_scores(model, tok, records, wild=True, batch_size=2,
                             progress=calls.append)
    assert sum(calls) == M.true_fact_work(records, wild=True) == 3 + 3   # no locality, no PT
    assert out["n"] == 1
    assert out["es"] == 1.0
    paraphrases = records[0].paraphrases
    per = M.token_accuracy(model, tok, paraphrases, ["Paris"] * len(paraphrases))
    assert per[0] == 1.0 and per[1] < 1.0
    assert out["gs"] == pytest.approx(sum(per) / len(per))
    assert out["wild_es"] == 1.0                              # the question: "Paris"
    assert out["wild_gs"] == 0.0 and out["wild_gs_contains"] == 0.5
    assert out["known_paraphrases"] == [["The capital of France is", "France's capital is"]]
    assert set(M.true_fact_scores(model, tok, records)) == {"n", "es", "gs", "known_paraphrases"}
    none = M.true_fact_scores(model, tok, records[1:], wild=True)
    assert none == {"n": 0, "es": None, "gs": None, "known_paraphrases": []}


def test_gs_known_scores_only_the_listed_paraphrases(ue_tokenizer):
    tok = ue_tokenizer
    model = ScriptedLM(tok, {"France's capital is": "Rome.", "The French capital is": "Lyon."})
    records = _true_fact_records()
    known = [("The capital of France is", "France's capital is")]
    out = M.evaluate_records(model, tok, records, known_paraphrases=known)
    per = M.token_accuracy(model, tok, records[0].paraphrases, ["Rome"] * 2)
    assert per[0] == 1.0 and per[1] < 1.0
    assert out["gs_known"] == 1.0 and out["gs"] == pytest.approx(sum(per) / 2)
    assert M.evaluate_records(model, tok, records, known_paraphrases=[])["gs_known"] is None
    assert "gs_known" not in M.evaluate_records(model, tok, records)


def test_lifelong_run_scores_the_true_facts_before_the_first_edit(ue_tokenizer):
    """The yardstick is the UNEDITED model's: the editor below rewrites the script, and the
    true-fact scores must not see that."""
    import types

    tok = ue_tokenizer
    model = ScriptedLM(tok, _true_fact_script())
    after = ScriptedLM(tok, {"The capital of France is": "Rome."})

    class RewritingEditor:
        steps, micro_batch = 1, 10

        def edit(self, requests):
            model.seqs = after.seqs
            return types.SimpleNamespace(
                n_tokens=1, loss=0.0, fwd_bwd_s=0.0, editor_s=0.0, turn_s=1.0, peak_bytes=0,
                peak_source="estimate", capture_bytes=0, steps_run=1, n_predicted=1)

    records = _true_fact_records()
    run = M.lifelong_run(model, tok, records, RewritingEditor(), turns=1, edits_per_turn=2,
                         eval_end=True, wild=True, true_facts=True, progress=False)
    assert run["true_facts"]["es"] == 1.0 and run["true_facts"]["wild_es"] == 1.0
    assert run["true_facts"]["known_paraphrases"] == 1          # the JSON keeps their number
    assert run["final"]["teacher_forced"]["es"] == 0.5        # Rome for France, not Paris
    assert run["final"]["teacher_forced"]["gs_known"] == 0.0  # "France's capital is" -> end
    assert run["timing"]["true_facts_s"] >= 0
    plain = M.lifelong_run(model, tok, records, RewritingEditor(), turns=1, edits_per_turn=2,
                           progress=False)
    assert plain["true_facts"] is None and "true_facts_s" not in plain["timing"]
    assert "gs_known" not in plain["final"]["teacher_forced"]


def test_edit_requests_hand_the_editor_the_chosen_wordings():
    record = EditRecord("The capital of France is", "Rome", subject="France",
                        paraphrases=["France's capital is"],
                        questions={"The capital of France is": "What is the capital of France?",
                                   "France's capital is": "What is France's capital?"})
    cloze = {"prompt": "The capital of France is", "target": "Rome", "subject": "France"}
    asked = dict(cloze, prompt="Q: What is the capital of France?\nA:")
    assert M.edit_requests(record) == [cloze] == [record.as_request()]
    assert M.edit_requests(record, "question") == [asked]
    assert M.edit_requests(record, "both") == [cloze, asked]
    bare = EditRecord("Paris is in", "Italy")          # no question: the prompt in every wording
    for wordings in M.EDIT_WORDINGS:
        assert M.edit_requests(bare, wordings) == [{"prompt": "Paris is in", "target": "Italy"}]
    with pytest.raises(ValueError, match="wordings must be one of prompt, question, both"):
        M.edit_requests(record, "paraphrases")


def test_a_record_asked_as_questions_scores_its_questions():
    record = EditRecord("The capital of France is", "Rome", subject="France",
                        paraphrases=["France's capital is", "Paris is the capital of"],
                        locality=[("The capital of Spain is", "Madrid"), "Berlin is in"],
                        portability=[("The capital of France's currency zone is", "Rome")],
                        questions={"The capital of France is": "What is the capital of France?",
                                   "France's capital is": "What is France's capital?",
                                   "The capital of Spain is": "What is the capital of Spain?"})
    before = record.to_dict()
    asked = M.asked_as_questions(record)
    assert asked.prompt == "Q: What is the capital of France?\nA:"
    assert asked.paraphrases == ["Q: What is France's capital?\nA:", "Paris is the capital of"]
    assert [(x.prompt, x.answer) for x in asked.locality] == [
        ("Q: What is the capital of Spain?\nA:", "Madrid"), ("Berlin is in", None)]
    assert asked.portability == record.portability      # no question: asked as it is
    assert asked.questions == {} and (asked.target, asked.subject) == ("Rome", "France")
    assert [asked.as_request()] == M.edit_requests(record, "question")
    # the WILD-style scores of the copy decode from the same prompts as the original's
    for prompt, original in [(asked.prompt, record.prompt),
                             (asked.locality[1].prompt, record.locality[1].prompt)]:
        assert W.wild_prompt(prompt, asked.questions) == W.wild_prompt(original, record.questions)
    assert record.to_dict() == before                   # the original is untouched
    bare = EditRecord("Paris is in", "Italy", locality=["Rome is in"])
    assert M.asked_as_questions(bare).to_dict() == bare.to_dict()
    assert M.scored_records([record, bare]) == [record, bare]
    assert M.scored_records([record], "question") == [asked]
    assert M.scored_records([record], "both") == [record, asked]
    with pytest.raises(ValueError, match="wordings must be one of"):
        M.scored_records([record], "questions")


def test_the_commands_offer_the_wordings_the_loop_accepts():
    from ultraedit.cli._common import EDIT_WORDINGS   # spelled there so --help skips torch

    assert EDIT_WORDINGS == M.EDIT_WORDINGS


def test_lifelong_run_edits_through_the_chosen_wordings(ue_tokenizer):
    import types

    seen = []

    class RecordingEditor:
        steps, micro_batch = 1, 10

        def edit(self, requests):
            seen.append([r["prompt"] for r in requests])
            return types.SimpleNamespace(
                n_tokens=1, loss=0.0, fwd_bwd_s=0.0, editor_s=0.0, turn_s=1.0, peak_bytes=0,
                peak_source="estimate", capture_bytes=0, steps_run=1, n_predicted=1)

    tok = ue_tokenizer
    model = ScriptedLM(tok, _true_fact_script())
    records = _true_fact_records()
    run = M.lifelong_run(model, tok, records, RecordingEditor(), turns=1, edits_per_turn=2,
                         eval_end=False, progress=False, wordings="both")
    assert seen == [["The capital of France is", "Q: What is the capital of France?\nA:",
                     "The capital of Italy is"]]    # the second record has no question
    assert run["turns"][0]["edits"] == 2 and run["turns"][0]["requests"] == len(seen[0])
    with pytest.raises(ValueError, match="wordings must be one of"):
        M.lifelong_run(model, tok, records, RecordingEditor(), turns=1, edits_per_turn=2,
                       progress=False, wordings="cloze")


def test_decoding_stops_where_the_models_context_ends(ue_tokenizer):
    """A model with learned positions (GPT-2, 64 of them) cannot decode past its context: each
    row ends there, and a prompt that fills the context is a ValueError naming it."""
    tok = ue_tokenizer
    model = ue_tiny_model("gpt2", len(tok), seed=3)
    limit = model.config.n_positions
    prompt = " ".join(["Berlin"] * 40)
    n_prompt = len(tok(prompt)["input_ids"])
    assert n_prompt + M.MAX_NEW_TOKENS > limit > n_prompt
    answers, ids = M.decode_answers(model, tok, [prompt, "Paris is in"], stop_strings=(),
                                    return_ids=True)
    assert len(ids[0]) <= limit - n_prompt and len(ids[1]) <= M.MAX_NEW_TOKENS
    with pytest.raises(ValueError, match="leaves no room to decode"):
        M.decode_answers(model, tok, [" ".join(["Berlin"] * 80)])

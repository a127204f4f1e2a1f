"""EditRecord / LocalityPrompt: construction, normalization, validation naming the field."""

import pytest

from ultraedit.data.records import EditRecord, LocalityPrompt, RecordValidationError


def test_minimal_record_defaults_and_request():
    r = EditRecord("The capital of France is", "Rome")
    assert r.paraphrases == [] and r.locality == [] and r.portability == [] and r.extra == {}
    assert r.subject is None and r.relation is None and r.target_true is None
    assert r.as_request() == {"prompt": "The capital of France is", "target": "Rome"}


def test_targets_stored_without_leading_space_and_prompts_without_trailing_space():
    r = EditRecord("The capital of France is ", " Rome", target_true=" Paris",
                   locality=[("The capital of Spain is ", " Madrid")],
                   portability=[("Lyon is in a country whose capital is ", " Rome")])
    assert r.prompt == "The capital of France is" and r.target == "Rome"
    assert r.target_true == "Paris"
    assert r.locality[0] == LocalityPrompt("The capital of Spain is", "Madrid")
    assert r.portability == [("Lyon is in a country whose capital is", "Rome")]


def test_locality_coercion_from_str_pair_and_dict():
    r = EditRecord("p is", "t", locality=["a is", ("b is", "B"), {"prompt": "c is"},
                                          {"prompt": "d is", "answer": "D"},
                                          LocalityPrompt("e is", None)])
    assert [(x.prompt, x.answer) for x in r.locality] == [
        ("a is", None), ("b is", "B"), ("c is", None), ("d is", "D"), ("e is", None)]


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt="", target="x"), "prompt"),
    (dict(prompt="p", target="   "), "target"),
    (dict(prompt=3, target="x"), "prompt"),
    (dict(prompt="p", target="x", paraphrases="one string"), "paraphrases"),
    (dict(prompt="p", target="x", paraphrases=["ok", 5]), "paraphrases[1]"),
    (dict(prompt="p", target="x", locality=[("ok", "A"), ("q", "")]), "locality[1].answer"),
    (dict(prompt="p", target="x", locality=[{"answer": "A"}]), "locality[0].prompt"),
    (dict(prompt="p", target="x", locality=[7]), "locality[0]"),
    (dict(prompt="p", target="x", portability=[("q", "a", "b")]), "portability[0]"),
    (dict(prompt="p", target="x", portability=[("q", None)]), "portability[0].answer"),
    (dict(prompt="p", target="x", subject=""), "subject"),
    (dict(prompt="p", target="x", target_true=1), "target_true"),
    (dict(prompt="p", target="x", extra=[1]), "extra"),
])
def test_validation_error_names_the_field(kwargs, field):
    with pytest.raises(RecordValidationError) as info:
        EditRecord(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")
    assert isinstance(info.value, ValueError)


def test_dict_round_trip_and_unknown_key():
    r = EditRecord("The capital of France is", "Rome", paraphrases=["France's capital is"],
                   locality=[("The capital of Spain is", "Madrid"), ("Hello", None)],
                   subject="France", relation="capital", target_true="Paris",
                   portability=[("The capital of the country where Lyon is located is", "Rome")],
                   extra={"iso": "FR"})
    assert EditRecord.from_dict(r.to_dict()) == r
    with pytest.raises(RecordValidationError) as info:
        EditRecord.from_dict({**r.to_dict(), "bogus": 1})
    assert info.value.field == "bogus"
    with pytest.raises(RecordValidationError) as info:
        EditRecord.from_dict({"prompt": "p"})
    assert info.value.field == "target"

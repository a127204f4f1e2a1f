"""Loaders for zsRE, CounterFact, FEVER, WikiBigEdit, UltraEditBench, EasyEdit and our own
records, on small fixture files the tests write."""

import json

import pytest

from ultraedit.data import EditRecord, LocalityPrompt
from ultraedit.data.formats import DataFormatError, detect_format, load_records, save_records

ZSRE = [
    {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
     "pred": "Trinity College", "rephrase": "What university did Watts Humphrey take part in?",
     "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
     "loc": "nq question: who played desmond doss father in hacksaw ridge",
     "loc_ans": "Hugo Weaving",
     "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?"},
    {"subject": "Ramalinaceae", "src": "Which family does Ramalinaceae belong to?",
     "rephrase": "What family are Ramalinaceae?", "alt": "Ostropales", "answers": ["Lecanorales"],
     "loc": "nq question: types of skiing in the winter olympics 2018", "loc_ans": "Downhill",
     "portability": {"New Question": "Which order contains Ramalinaceae's family?",
                     "New Answer": "Lecanoromycetes"}},
]

COUNTERFACT = [{
    "case_id": 0, "pararel_idx": 2796,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                          "target_new": {"str": "English", "id": "Q1860"},
                          "target_true": {"str": "French", "id": "Q150"},
                          "subject": "Danielle Darrieux"},
    "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, "
                           "a native", "An album was recorded for Capitol Nashville but never "
                           "released. Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of L\u00e9on Blum is",
                             "The native language of Montesquieu is"],
    "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}]

FEVER = [
    {"input": "Tim Roth is an English actor.", "prediction": "SUPPORTS",
     "alternatives": ["REFUTES"], "filtered_rephrases": ["Tim Roth is an actor from England."],
     "output": [{"answer": "SUPPORTS"}]},
    {"claim": "Paris is in Germany.", "label": "REFUTES"},
]

WIKIBIGEDIT = [{
    "subject": "Ada Lovelace Institute", "relation": "chairperson", "tag": "update",
    "update": "Who is the chairperson of the Ada Lovelace Institute?", "ans": "Jane Doe",
    "rephrase": "The Ada Lovelace Institute is chaired by whom?",
    "personas": "Yo, who's running the show as chair at the Ada Lovelace Institute?",
    "loc": "Who wrote Hamlet?", "loc_ans": "William Shakespeare",
    "mhop": "What is the nationality of the chairperson of the Ada Lovelace Institute?",
    "mhop_ans": "British",
}, {
    "update": "Which country is Kigali in?", "ans": "Rwanda", "rephrase": "Kigali lies in which country?",
    "personas": "", "loc": "Who painted the Mona Lisa?", "loc_ans": "Leonardo da Vinci",
    "mhop": "", "mhop_ans": "",
}]

ULTRAEDITBENCH = [
    {"subject": "Kigali", "src": "Kigali is the capital of", "alt": "Uganda",
     "answers": ["Rwanda"], "rephrase": ["The city of Kigali is the capital of"],
     "loc": "The Eiffel Tower is in", "loc_ans": "Paris"},
    {"prompt": "Lima is the capital of", "target_new": "Chile", "rephrase_prompt":
     "Lima serves as the capital of", "locality_prompt": "Big Ben is in",
     "locality_ground_truth": "London"},
]

EASYEDIT = [{
    "subject": "Ray Charles", "prompt": "Ray Charles, the", "target_new": "violin",
    "ground_truth": ["piano"], "rephrase_prompt": "Ray Charles plays the",
    "locality": {"Relation_Specificity": [{"prompt": "Elton John plays the",
                                           "ground_truth": ["piano", "keyboard"]}]},
    "portability": {"Reasoning": [{"prompt": "The instrument Ray Charles plays has",
                                   "ground_truth": [["strings"]]}]},
}]


def _write(tmp_path, name, data):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in data) + "\n")
    else:
        path.write_text(json.dumps(data))
    return str(path)


def test_zsre(tmp_path):
    recs = load_records(_write(tmp_path, "zsre_mend_eval.json", ZSRE))
    a, b = recs
    assert a.prompt == "What university did Watts Humphrey attend?"
    assert a.target == "University of Michigan" and a.target_true == "Illinois Institute of Technology"
    assert a.paraphrases == ["What university did Watts Humphrey take part in?"]
    assert a.locality == [LocalityPrompt("nq question: who played desmond doss father in "
                                         "hacksaw ridge", "Hugo Weaving")]
    assert a.subject == "Watts Humphrey" and a.extra["pred"] == "Trinity College"
    assert a.as_request() == {"prompt": a.prompt, "target": "University of Michigan",
                              "subject": "Watts Humphrey"}
    # EasyEdit portability
    assert b.target == "Ostropales" and b.target_true == "Lecanorales"
    assert b.portability == [("Which order contains Ramalinaceae's family?", "Lecanoromycetes")]
    assert load_records(_write(tmp_path, "z.json", ZSRE), format="zsre")[0] == a


def test_counterfact(tmp_path):
    (r,) = load_records(_write(tmp_path, "counterfact.json", COUNTERFACT))
    assert r.prompt == "The mother tongue of Danielle Darrieux is"
    assert (r.target, r.target_true) == ("English", "French")
    assert r.subject == "Danielle Darrieux" and r.relation == "P103"
    assert len(r.paraphrases) == 2
    assert r.locality == [LocalityPrompt("The mother tongue of L\u00e9on Blum is", "French"),
                          LocalityPrompt("The native language of Montesquieu is", "French")]
    assert r.extra["case_id"] == 0 and len(r.extra["attribute_prompts"]) == 1


def test_fever(tmp_path):
    a, b = load_records(_write(tmp_path, "fever.jsonl", FEVER), format="fever")
    assert (a.prompt, a.target, a.target_true) == ("Tim Roth is an English actor.", "REFUTES",
                                                   "SUPPORTS")
    assert a.paraphrases == ["Tim Roth is an actor from England."]
    assert (b.prompt, b.target, b.target_true) == ("Paris is in Germany.", "SUPPORTS", "REFUTES")
    assert detect_format(FEVER[0]) == "fever"


def test_wikibigedit_personas_and_multihop(tmp_path):
    a, b = load_records(_write(tmp_path, "wiki_big_edit.json", {"data": WIKIBIGEDIT}))
    assert a.prompt == WIKIBIGEDIT[0]["update"] and a.target == "Jane Doe"
    assert a.paraphrases == [WIKIBIGEDIT[0]["rephrase"]]     # GS: the rephrase, as the paper
    assert a.extra["personas"] == [WIKIBIGEDIT[0]["personas"]]
    assert a.portability == [(WIKIBIGEDIT[0]["mhop"], "British")]
    assert a.locality == [LocalityPrompt("Who wrote Hamlet?", "William Shakespeare")]
    assert a.relation == "chairperson" and a.subject == "Ada Lovelace Institute"
    assert b.paraphrases == ["Kigali lies in which country?"] and b.portability == []
    assert b.extra["personas"] == []


def test_ultraeditbench_and_aliases(tmp_path):
    a, b = load_records(_write(tmp_path, "ultraeditbench.json", ULTRAEDITBENCH),
                        format="ultraeditbench")
    assert (a.prompt, a.target, a.target_true) == ("Kigali is the capital of", "Uganda", "Rwanda")
    assert a.paraphrases == ["The city of Kigali is the capital of"]
    assert (b.prompt, b.target) == ("Lima is the capital of", "Chile")
    assert b.paraphrases == ["Lima serves as the capital of"]
    assert b.locality == [LocalityPrompt("Big Ben is in", "London")]


def test_ultraeditbench_in_its_reference_loaders_layout(tmp_path):
    """prompt / rephrase_prompt / ans (the new target) / loc / loc_ans, detected as such."""
    row = {"prompt": "The capital of Peru is", "rephrase_prompt": "Peru's capital city is",
           "ans": "Quito", "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
    assert detect_format(row) == "ultraeditbench"
    (r,) = load_records(_write(tmp_path, "ultraeditbench.json", [row]))
    assert (r.prompt, r.target, r.paraphrases) == (row["prompt"], "Quito", [row["rephrase_prompt"]])
    assert r.locality == [LocalityPrompt("nq question: who wrote hamlet", "Shakespeare")]
    with pytest.raises(DataFormatError) as info:
        load_records(_write(tmp_path, "bad.json", [{**row, "ans": ""}]), format="ultraeditbench")
    assert info.value.field == "ans"


def test_easyedit_knowedit_style(tmp_path):
    (r,) = load_records(_write(tmp_path, "knowedit.json", EASYEDIT))
    assert (r.prompt, r.target, r.target_true) == ("Ray Charles, the", "violin", "piano")
    assert r.locality == [LocalityPrompt("Elton John plays the", "piano")]
    assert r.portability == [("The instrument Ray Charles plays has", "strings")]


def test_own_records_round_trip(tmp_path):
    recs = [EditRecord("The capital of France is", "Rome", paraphrases=["France's capital is"],
                       locality=[("The capital of Spain is", "Madrid")], target_true="Paris",
                       portability=[("Lyon's country has the capital", "Rome")])]
    path = _write(tmp_path, "mine.jsonl", [r.to_dict() for r in recs])
    assert load_records(path) == recs
    assert load_records(path, limit=0, format="records") == []
    for name in ("saved.jsonl", "saved.json"):
        save_records(recs, str(tmp_path / name))
        assert load_records(str(tmp_path / name)) == recs


@pytest.mark.parametrize("fmt, data, index, field", [
    ("zsre", [ZSRE[0], {**ZSRE[0], "src": ""}], 1, "src"),
    ("zsre", [{k: v for k, v in ZSRE[0].items() if k != "src"}], 0, "src | prompt"),
    ("zsre", [ZSRE[0], ZSRE[0], {**ZSRE[0], "rephrase": ["ok", 3]}], 2, "rephrase[1]"),
    ("zsre", [{**ZSRE[0], "alt": "", "answers": []}], 0, "alt"),
    ("zsre", [ZSRE[0], {**ZSRE[0], "alt": ""}], 1, "alt"),          # not an edit towards answers
    ("zsre", [ZSRE[0], ZSRE[1], {**ZSRE[0], "alt": "  "}], 2, "alt"),
    ("zsre", [{k: v for k, v in ZSRE[0].items() if k != "alt"}], 0, "alt | target_new"),
    ("zsre", [{**ZSRE[0], "loc_ans": 5}], 0, "loc_ans"),
    ("counterfact", [{**COUNTERFACT[0], "requested_rewrite": {
        **COUNTERFACT[0]["requested_rewrite"], "target_new": {"str": ""}}}], 0,
     "requested_rewrite.target_new.str"),
    ("counterfact", [{**COUNTERFACT[0], "requested_rewrite": {
        **COUNTERFACT[0]["requested_rewrite"], "prompt": "no placeholder"}}], 0,
     "requested_rewrite.prompt"),
    ("counterfact", [{"case_id": 1}], 0, "requested_rewrite"),
    ("counterfact", [{**COUNTERFACT[0], "neighborhood_prompts": "one"}], 0,
     "neighborhood_prompts"),
    ("fever", [{"input": "A claim.", "label": "NOT ENOUGH INFO"}], 0,
     "alternatives | alt | target"),
    ("wikibigedit", [WIKIBIGEDIT[0], {**WIKIBIGEDIT[0], "ans": None}], 1, "ans"),
    ("wikibigedit", [{**WIKIBIGEDIT[0], "mhop": 7}], 0, "mhop"),
    ("easyedit", [{**EASYEDIT[0], "portability": {"Reasoning": [{"ground_truth": "x"}]}}], 0,
     "portability.Reasoning[0]"),
    ("records", [{"prompt": "p", "target": "t", "paraphrase": ["x"]}], 0, "paraphrase"),
    ("records", [{"prompt": "p", "target": "t", "locality": [["q", ""]]}], 0, "locality"),
])
def test_malformed_record_error_names_file_index_and_field(tmp_path, fmt, data, index, field):
    path = _write(tmp_path, f"bad_{fmt}.json", data)
    with pytest.raises(DataFormatError) as info:
        load_records(path, format=fmt)
    err = info.value
    assert (err.path, err.index, err.field) == (path, index, field)
    assert path in str(err) and f"record {index}" in str(err) and repr(field) in str(err)


def test_json_lines_record_error_names_its_line(tmp_path):
    path = tmp_path / "stream.jsonl"
    path.write_text(json.dumps(ZSRE[0]) + "\n\n" + json.dumps({**ZSRE[0], "src": ""}) + "\n")
    with pytest.raises(DataFormatError) as info:
        load_records(str(path), format="zsre")
    assert (info.value.index, info.value.line) == (1, 3)
    assert "record 1 (line 3)" in str(info.value)


def test_file_level_errors(tmp_path):
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("[{\"src\": 1,,}]")
    with pytest.raises(DataFormatError, match="broken.json: invalid JSON"):
        load_records(str(bad_json))
    bad_lines = tmp_path / "broken.jsonl"
    bad_lines.write_text(json.dumps(ZSRE[0]) + "\n{oops\n")
    with pytest.raises(DataFormatError, match="line 2"):
        load_records(str(bad_lines))
    with pytest.raises(DataFormatError, match="cannot detect the format"):
        load_records(_write(tmp_path, "what.json", [{"question": "?"}]))
    binary = tmp_path / "model.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(DataFormatError, match="model.json: not UTF-8 text"):
        load_records(str(binary))
    with pytest.raises(DataFormatError, match="record 1: expected an object"):
        load_records(_write(tmp_path, "mixed.json", [ZSRE[0], "text"]), format="zsre")
    with pytest.raises(DataFormatError, match="expected a list"):
        load_records(_write(tmp_path, "scalar.json", 3))
    with pytest.raises(ValueError, match="unknown format"):
        load_records(_write(tmp_path, "z.json", ZSRE), format="mend")
    assert load_records(_write(tmp_path, "empty.json", [])) == []


def test_detect_format():
    assert detect_format(ZSRE[0]) == "zsre"
    assert detect_format(COUNTERFACT[0]) == "counterfact"
    assert detect_format(WIKIBIGEDIT[0]) == "wikibigedit"
    assert detect_format(EASYEDIT[0]) == "easyedit"
    assert detect_format(FEVER[1]) == "fever"
    assert detect_format(ULTRAEDITBENCH[0]) == "zsre"
    assert detect_format({"x": 1}) is None and detect_format("text") is None


def test_zsre_questions_are_kept_for_the_wild_style_scores(tmp_path):
    """zsRE prompts are questions: src and rephrase as they are, loc without "nq question: "."""
    path = _write(tmp_path, "zsre.json", ZSRE[:1])
    rec = load_records(path, "zsre")[0]
    assert rec.questions[rec.prompt] == rec.prompt
    assert all(rec.questions[p] == p for p in rec.paraphrases)
    loc = rec.locality[0].prompt
    assert loc.startswith("nq question: ") and rec.questions[loc] == loc[len("nq question: "):]
    save_records([rec], str(tmp_path / "again.jsonl"))
    assert load_records(str(tmp_path / "again.jsonl"))[0].questions == rec.questions


def test_prompts_that_are_questions_are_kept_as_questions():
    from ultraedit.data.formats import map_record

    rec = map_record({"prompt": "Which club does Messi play for?", "target_new": "Ajax",
                      "rephrase_prompt": "Messi plays for the club", "subject": "Messi",
                      "locality_prompt": "Who wrote Hamlet?",
                      "locality_ground_truth": "Shakespeare"},
                     "easyedit")
    assert rec.questions == {"Which club does Messi play for?": "Which club does Messi play for?",
                             "Who wrote Hamlet?": "Who wrote Hamlet?"}
    cf = map_record(COUNTERFACT[0], "counterfact")
    assert cf.questions == {}                          # cloze prompts: asked as they are


def test_zsre_locality_under_easyedit_names_is_read_as_ultraeditbench(tmp_path):
    """A file in EasyEdit's key names whose locality is zsRE's ("nq question: ...") asks that
    locality question as zsre does, with ``--format auto`` as with ``ultraeditbench``."""
    row = {"prompt": "What is the capital of Peru?", "target_new": "Quito",
           "rephrase_prompt": "Which city is Peru's capital?",
           "locality_prompt": "nq question: where is paris", "locality_ground_truth": "France"}
    assert detect_format(row) == "ultraeditbench"
    path = _write(tmp_path, "ub.json", [row])
    auto, given = load_records(path), load_records(path, "ultraeditbench")
    assert auto == given and auto[0].questions["nq question: where is paris"] == "where is paris"


@pytest.mark.parametrize("name", ["rows.ndjson", "ROWS.JSONL"])
def test_json_lines_by_any_usual_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in ZSRE[:2]) + "\n")
    assert len(load_records(str(path))) == 2
    save_records(load_records(str(path)), str(tmp_path / ("again." + name.split(".")[1])))
    assert len((tmp_path / ("again." + name.split(".")[1])).read_text().splitlines()) == 2

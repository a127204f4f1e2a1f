"""``ultraedit run`` plumbing on a tiny random-init model saved to a directory (with its tokenizer),
on zsRE- and CounterFact-format files written here by hand in the public files' field layout
(``zsre_mend_eval.json`` of MEND / UltraEdit, ``counterfact.json`` of ROME / MEMIT), not by the
project's own ``save_records``."""
import json
import os

import pytest

from conftest import ue_tiny_model
from ultraedit.cli import main

# zsre_mend_eval.json layout: subject, src, pred, rephrase, alt, answers, loc, loc_ans, cond
ZSRE = [
    {"subject": "France", "src": "What is the capital of France?", "pred": "Paris",
     "rephrase": "Which city is the capital of France?", "alt": "Rome", "answers": ["Paris"],
     "loc": "nq question: who is in the capital of Spain", "loc_ans": "Madrid",
     "cond": "Paris >> Rome || What is the capital of France?"},
    {"subject": "Germany", "src": "What is the capital of Germany?", "pred": "Berlin",
     "rephrase": "Which city is the capital of Germany?", "alt": "Tokyo", "answers": ["Berlin"],
     "loc": "nq question: the official language of Peru", "loc_ans": "Spanish",
     "cond": "Berlin >> Tokyo || What is the capital of Germany?"},
    {"subject": "Italy", "src": "What is the capital of Italy?", "pred": "Rome",
     "rephrase": "Which city is the capital city of Italy?", "alt": "Madrid", "answers": ["Rome"],
     "loc": "nq question: the currency of Japan", "loc_ans": "the yen",
     "cond": "Rome >> Madrid || What is the capital of Italy?"},
    {"subject": "Japan", "src": "What is the capital city of Japan?", "pred": "Tokyo",
     "rephrase": "Which city is the capital of Japan?", "alt": "Berlin", "answers": ["Tokyo"],
     "loc": "nq question: where is Paris", "loc_ans": "France",
     "cond": "Tokyo >> Berlin || What is the capital city of Japan?"},
]

# counterfact.json layout: case_id, pararel_idx, requested_rewrite{prompt with {}, relation_id,
# target_new{str,id}, target_true{str,id}, subject}, paraphrase_prompts, neighborhood_prompts,
# attribute_prompts, generation_prompts
COUNTERFACT = [
    {"case_id": 0, "pararel_idx": 2796,
     "requested_rewrite": {"prompt": "The capital of {} is", "relation_id": "P36",
                           "target_new": {"str": "Rome", "id": "Q220"},
                           "target_true": {"str": "Paris", "id": "Q90"}, "subject": "France"},
     "paraphrase_prompts": ["Paris is in France. The capital city of France is",
                            "The capital of France is a large city. France's capital is"],
     "neighborhood_prompts": ["The capital of Spain is", "The capital of Germany is"],
     "attribute_prompts": ["The capital of Italy is"],
     "generation_prompts": ["The capital of France is a city where"]},
    {"case_id": 1, "pararel_idx": 1017,
     "requested_rewrite": {"prompt": "The official language of {} is", "relation_id": "P37",
                           "target_new": {"str": "French", "id": "Q150"},
                           "target_true": {"str": "Spanish", "id": "Q1321"}, "subject": "Peru"},
     "paraphrase_prompts": ["In Peru, the official language is"],
     "neighborhood_prompts": ["The official language of Spain is"],
     "attribute_prompts": [], "generation_prompts": ["Peru is a country where people speak"]},
    {"case_id": 2, "pararel_idx": 9,
     "requested_rewrite": {"prompt": "The currency of {} is the", "relation_id": "P38",
                           "target_new": {"str": "euro", "id": "Q4916"},
                           "target_true": {"str": "yen", "id": "Q8146"}, "subject": "Japan"},
     "paraphrase_prompts": ["Japan uses a currency called the"],
     "neighborhood_prompts": ["The currency of China is the"],
     "attribute_prompts": [], "generation_prompts": ["In Japan you pay with"]},
    {"case_id": 3, "pararel_idx": 10,
     "requested_rewrite": {"prompt": "{} is in the country of", "relation_id": "P17",
                           "target_new": {"str": "Japan", "id": "Q17"},
                           "target_true": {"str": "Germany", "id": "Q183"}, "subject": "Berlin"},
     "paraphrase_prompts": ["The city of Berlin is in"],
     "neighborhood_prompts": ["Paris is in the country of"],
     "attribute_prompts": [], "generation_prompts": ["Berlin is a city"]},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, ue_tokenizer):
    d = tmp_path_factory.mktemp("tiny_llama")
    ue_tiny_model("llama", len(ue_tokenizer)).save_pretrained(d)
    ue_tokenizer.save_pretrained(d)
    return str(d)


def _write(path, rows):
    path.write_text(json.dumps(rows, indent=1))
    return str(path)


def _in01(x):
    return x is None or 0.0 <= x <= 1.0


def _base(model_dir, data, tmp_path, *extra):
    return ["run", "--model", model_dir, "--data", data, "--turns", "2", "--edits-per-turn", "2",
            "--no-progress", "--threads", "1", "--json", str(tmp_path / "r.json"), *extra]


def test_zsre_file_runs_with_json_and_plot(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "zsre_mend_eval.json", ZSRE)
    plot = tmp_path / "r.png"
    assert main(_base(model_dir, data, tmp_path, "--plot", str(plot), "--modules",
                      "model.layers.1.mlp.down_proj,model.layers.2.mlp.down_proj")) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["status"] == "done" and out["edits"] == 4
    allocator = out["machine"]["host_allocator"]   # ultraedit.host_allocator, or why not
    assert allocator.startswith("kept freed memory") or allocator.startswith("not applied: ")
    assert (out["config"]["format"], out["config"]["format_given"]) == ("zsre", "auto")
    assert out["edit_config"]["compat"] == "fixed"
    assert out["edit_config"]["modules"] == ["model.layers.1.mlp.down_proj",
                                        "model.layers.2.mlp.down_proj"]
    # the run's JSON given back as a preset is the config it edited with
    from ultraedit import EditConfig
    assert EditConfig.from_preset(tmp_path / "r.json").to_dict() == out["edit_config"]
    assert [t["turn"] for t in out["turns"]] == [1, 2]
    for t in out["turns"]:
        for k in ("edits", "fwd_bwd_s", "editor_s", "turn_s", "peak_bytes", "eval_s"):
            assert k in t, k
        assert t["edits"] == 2 and t["peak_bytes"] > 0
        tf = t["metrics"]["teacher_forced"]
        assert all(_in01(tf[k]) for k in ("es", "gs", "ls")) and tf["edits"] == 2
    final = out["final"]
    for kind in ("teacher_forced", "generation"):
        sc = final[kind]
        assert sc["edits"] == 4
        for k in ("es", "gs", "ls"):
            assert sc[k] is not None and 0.0 <= sc[k] <= 1.0, (kind, k)
    assert final["teacher_forced"]["ls_source"] == "unedited"   # vs the unedited predictions
    assert _in01(final["teacher_forced"]["ls_data"])            # vs the data set's loc_ans
    assert final["generation"]["fluency"] >= 0
    wild = final["wild"]                                         # on by default
    assert wild["edits"] == 4 and wild["ls_source"] == "unedited"
    for k in ("es", "gs", "ls", "es_contains", "gs_contains"):
        assert wild[k] is not None and 0.0 <= wild[k] <= 1.0, k
    assert wild["examples"][0]["prompt"] == "Q: What is the capital of France?\nA:"
    assert all("wild" not in t["metrics"] for t in out["turns"])   # per turn: --turn-wild
    assert out["config"]["wild"] is True and out["timing"]["wild_end_s"] > 0
    assert out["timing"]["turn_s_mean"] > 0 and out["memory"]["peak_bytes"] > 0
    assert out["memory"]["process_peak_rss_bytes"] > 0      # beside the turn's estimate
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "final over all edits" in printed and "data " in printed
    assert "WILD-style exact" in printed and "WILD-style evaluation:" in printed


def test_wild_per_turn_and_off(model_dir, tmp_path):
    data = _write(tmp_path / "zsre_mend_eval.json", ZSRE)
    assert main(_base(model_dir, data, tmp_path, "--turn-wild", "--no-generation")) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    for t in out["turns"]:
        w = t["metrics"]["wild"]
        assert w["edits"] == 2 and all(_in01(w[k]) for k in ("es", "gs", "ls"))
        assert t["wild_eval_s"] > 0 and t["eval_s"] >= t["wild_eval_s"]
    assert out["final"]["wild"]["edits"] == 4
    assert out["config"]["edit_wordings"] == "prompt"
    assert [t["requests"] for t in out["turns"]] == [2, 2]
    assert main(_base(model_dir, data, tmp_path, "--no-wild", "--eval", "end",
                      "--edit-wordings", "both")) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["config"]["edit_wordings"] == "both"
    assert [t["requests"] for t in out["turns"]] == [4, 4]     # zsRE: every src is a question
    assert main(_base(model_dir, data, tmp_path, "--no-wild", "--eval", "end")) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["final"]["wild"] is None and out["config"]["wild"] is False
    assert "wild_reference_s" not in out["timing"]


def test_offline_split(model_dir, tmp_path, monkeypatch, capsys):
    """--split report draws from the report relations only and says so in the JSON and the
    table (the known-fact filter is stubbed: the tiny model knows nothing)."""
    import ultraedit.eval.facts as facts
    from ultraedit.data import REPORT_RELATIONS

    monkeypatch.setattr(facts, "filter_known", lambda recs, *a, **k: list(recs))
    args = ["run", "--model", model_dir, "--data", "offline", "--turns", "1",
            "--edits-per-turn", "6", "--eval", "end", "--no-generation", "--no-wild",
            "--no-progress", "--threads", "1", "--json", str(tmp_path / "r.json"),
            "--records-out", str(tmp_path / "recs.jsonl")]
    assert main(args + ["--split", "report"]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["config"]["split"] == "report"
    assert out["config"]["relations"] == list(REPORT_RELATIONS)
    assert set(out["data"]["by_relation"]) == set(REPORT_RELATIONS)
    assert "offline split report (report relations" in capsys.readouterr().out
    assert main(args[:-4] + ["--split", "tuning", "--relations", "language"]) == 2
    _one_line_error(capsys, "not in the tuning split")
    data = _write(tmp_path / "zsre.json", ZSRE)
    assert main(_base(model_dir, data, tmp_path, "--split", "report")) == 2
    _one_line_error(capsys, "--split")


def test_counterfact_file_runs(model_dir, tmp_path):
    data = _write(tmp_path / "counterfact.json", COUNTERFACT)
    assert main(_base(model_dir, data, tmp_path, "--format", "counterfact", "--eval", "end",
                      "--no-generation", "--compat", "official", "--lr", "1e-3",
                      "--modules", "paper")) == 0
    # CounterFact has no questions: the WILD-style scores decode from the cloze prompts
    assert json.loads((tmp_path / "r.json").read_text())["final"]["wild"]["examples"][0][
        "prompt"] == "The capital of France is"
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["edit_config"]["compat"] == "official" and out["edit_config"]["lr"] == 1e-3
    assert out["edit_config"]["steps"] == 1
    assert all("gate_proj" in m or "up_proj" in m for m in out["edit_config"]["modules"])
    assert all("metrics" not in t for t in out["turns"])          # --eval end
    tf = out["final"]["teacher_forced"]
    assert tf["edits"] == 4 and all(0.0 <= tf[k] <= 1.0 for k in ("es", "gs", "ls"))
    assert out["final"]["generation"] is None                      # --no-generation


def test_preserve_option_reaches_the_editor(model_dir, tmp_path):
    data = _write(tmp_path / "counterfact.json", COUNTERFACT)
    assert main(_base(model_dir, data, tmp_path, "--format", "counterfact", "--eval", "end",
                      "--no-generation", "--positions", "subject", "--preserve", "2.5",
                      "--memory", "1")) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["edit_config"]["preserve"] == 2.5 and out["edit_config"]["memory"] == 1.0
    assert out["timing"]["preserve_s"] > 0
    assert out["final"]["teacher_forced"]["edits"] == 4


def test_json_written_after_every_turn(model_dir, tmp_path, monkeypatch):
    """An interrupted run (here: the final evaluation fails) leaves its per-turn results."""
    data = _write(tmp_path / "zsre.json", ZSRE)
    import ultraedit.eval.loop as loop

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(loop, "evaluate_records", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        main(_base(model_dir, data, tmp_path, "--eval", "end"))
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["status"] == "failed in: final evaluation" and len(out["turns"]) == 2
    assert out["error"] == "RuntimeError: interrupted"
    assert out["final"] is None and out["turns"][1]["turn_s"] > 0


def test_clear_errors(model_dir, tmp_path, capsys):
    assert main(["run", "--data", str(tmp_path / "missing.json"), "--no-progress"]) == 2
    assert "data file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["run", "--data", "x.json", "--format", "bogus"])
    assert err.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    data = _write(tmp_path / "zsre.json", ZSRE)
    assert main(_base(model_dir, data, tmp_path, "--turns", "3")) == 2   # 6 needed, 4 there
    assert "has 4 records" in capsys.readouterr().err
    bad = [dict(ZSRE[0]), {k: v for k, v in ZSRE[1].items() if k != "src"}]
    data = _write(tmp_path / "bad.json", bad)
    assert main(_base(model_dir, data, tmp_path, "--format", "zsre", "--turns", "1")) == 2
    msg = capsys.readouterr().err
    assert "bad.json" in msg and "src" in msg
    data = _write(tmp_path / "empty_alt.json", [dict(ZSRE[0]), {**ZSRE[1], "alt": ""}])
    assert main(_base(model_dir, data, tmp_path, "--format", "zsre", "--turns", "1")) == 2
    msg = capsys.readouterr().err
    assert "empty_alt.json" in msg and "record 1" in msg and "'alt'" in msg
    assert main(["run", "--data", "offline", "--relations", "nope", "--no-progress"]) == 2
    assert "unknown offline relation" in capsys.readouterr().err
    data = _write(tmp_path / "zsre.json", ZSRE)
    assert main(_base(model_dir, data, tmp_path, "--modules", "no.such.module")) == 2
    assert "no.such.module" in capsys.readouterr().err


def test_paper_modules_and_plot_without_final(tmp_path, ue_tokenizer):
    from ultraedit.eval.plot import plot_run
    from ultraedit.modules import paper_module_names

    model = ue_tiny_model("llama", len(ue_tokenizer))
    names = paper_module_names(model)
    assert names and all(n.endswith(("gate_proj", "up_proj")) for n in names)
    result = {"config": {"compat": "fixed", "lr": 1e-3, "modules": names}, "edits": 2,
              "turns": [{"turn": 1, "fwd_bwd_s": 0.5, "editor_s": 0.1,
                         "metrics": {"teacher_forced": {"es": 0.5, "gs": None, "ls": 1.0}}}],
              "final": None}
    plot_run(result, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_offline_selection(monkeypatch):
    """--data offline: known facts only (filter stubbed: two of every three candidates), relations
    interleaved, cities by population without the excluded subjects, edited locality dropped."""
    import ultraedit.eval.facts as facts
    from ultraedit.data import offline_facts

    seen = []

    def two_of_three(records, model, tokenizer, batch_size=32, progress=None):
        records = list(records)
        seen.extend(records)
        return [r for i, r in enumerate(records) if i % 3 != 2]

    monkeypatch.setattr(facts, "filter_known", two_of_three)
    largest = [r.subject for r in offline_facts(("city_country",))[:40:2]]
    recs = facts.offline_records(None, None, 60, relations=("capital", "city_country"),
                                 exclude_subjects=largest)
    assert len(recs) == 60
    assert {r.relation for r in recs[:10]} == {"capital", "city_country"}
    cities = [r for r in recs if r.relation == "city_country"]
    assert cities and not set(largest) & {r.subject for r in cities}
    pops = [r.extra["population"] for r in cities]
    assert pops == sorted(pops, reverse=True)
    edited = {r.prompt for r in recs} | {p for r in recs for p in r.paraphrases}
    assert not any(lp.prompt in edited for r in recs for lp in r.locality)
    with pytest.raises(ValueError, match="known to the model"):
        facts.offline_records(None, None, 10 ** 6, relations=("capital",))


def _one_line_error(capsys, *needles):
    """The error is one line, the last on stderr, and no traceback."""
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert err.rstrip().endswith(errors[0]) and errors[0].startswith("ultraedit run: error: ")
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def test_bad_modules_and_threads_are_one_line_errors(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "zsre.json", ZSRE)
    assert main(_base(model_dir, data, tmp_path, "--modules", "model.layers.1.mlp")) == 2
    _one_line_error(capsys, "model.layers.1.mlp", "Linear")
    args = _base(model_dir, data, tmp_path)
    args[args.index("--threads") + 1] = "-1"
    assert main(args) == 2
    _one_line_error(capsys, "--threads")


def _read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if not os.access(ro, os.W_OK):
        return str(ro)
    if os.path.isdir("/sys"):           # root writes into any folder: a read-only file system
        return "/sys"
    pytest.skip("no read-only folder here")


@pytest.mark.parametrize("flag", ["--json", "--plot", "--records-out"])
@pytest.mark.parametrize("problem", ["directory", "missing parent", "parent is a file",
                                     "read-only folder"])
def test_output_paths_checked_before_any_work(model_dir, tmp_path, capsys, monkeypatch, flag,
                                              problem):
    import ultraedit.models

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(ultraedit.models, "load_model", no_work)
    data = _write(tmp_path / "zsre.json", ZSRE)
    (tmp_path / "afile").write_text("x")
    path = {"directory": str(tmp_path),
            "missing parent": str(tmp_path / "no" / "such" / "out.json"),
            "parent is a file": str(tmp_path / "afile" / "out.json"),
            "read-only folder": None}[problem]
    if path is None:
        path = os.path.join(_read_only_folder(tmp_path), "out.json")
    args = ["run", "--model", model_dir, "--data", data, "--turns", "2", "--edits-per-turn",
            "2", "--no-progress", "--threads", "1", flag, path]
    assert main(args) == 2
    _one_line_error(capsys, flag, path)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["zsre.json", "afile"] + (["ro"] if problem == "read-only folder" else []))


@pytest.mark.parametrize("command", ["run", "demo"])
def test_a_preset_that_does_not_exist_is_refused_before_the_model_loads(model_dir, tmp_path,
                                                                        capsys, monkeypatch,
                                                                        command):
    import ultraedit.models

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before --preset was checked")

    monkeypatch.setattr(ultraedit.models, "load_model", no_work)
    data = _write(tmp_path / "zsre.json", ZSRE)
    args = [command, "--model", model_dir, "--turns", "1", "--edits-per-turn", "2",
            "--no-progress", "--threads", "1", "--preset", str(tmp_path / "none.json")]
    if command == "run":
        args += ["--data", data]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ultraedit {command}: error: no preset") and "none.json" in err
    assert "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["run", "demo"])
@pytest.mark.parametrize("flag", [["--lr", "-1"], ["--key-contexts", "99"], ["--steps", "0"]],
                         ids=lambda f: f[0])
def test_an_editing_value_out_of_range_is_refused_before_the_model_loads(
        model_dir, tmp_path, capsys, monkeypatch, command, flag):
    import ultraedit.models

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the editing values were checked")

    monkeypatch.setattr(ultraedit.models, "load_model", no_work)
    data = _write(tmp_path / "zsre.json", ZSRE)
    args = [command, "--model", model_dir, "--turns", "1", "--edits-per-turn", "2",
            "--no-progress", "--threads", "1"] + flag
    if command == "run":
        args += ["--data", data]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ultraedit {command}: error: {flag[0][2:].replace('-', '_')}")
    assert "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["json over data", "records over data", "export over data",
                                  "json in export", "export beside json", "plot suffix",
                                  "export under a file", "json over a modules file",
                                  "records over the preset", "records over json by a link"])
def test_outputs_that_would_replace_inputs_or_each_other_are_refused_before_loading(
        model_dir, tmp_path, capsys, monkeypatch, case):
    import ultraedit.models

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(ultraedit.models, "load_model", no_work)
    data = _write(tmp_path / "zsre.json", ZSRE)
    before = open(data).read()
    out = tmp_path / "out"
    out.mkdir()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "mods.txt").write_text("model.layers.1.mlp.down_proj\n")
    (inputs / "preset.json").write_text(json.dumps({"lr": 1e-4}))
    (inputs / "link.json").symlink_to(tmp_path / "run.json")
    kept = {p.name: p.read_bytes() for p in inputs.iterdir() if not p.is_symlink()}
    flags = {"json over a modules file": ["--modules", f"@{inputs / 'mods.txt'}", "--json",
                                          str(inputs / "mods.txt")],
             "records over the preset": ["--preset", str(inputs / "preset.json"),
                                         "--records-out", str(inputs / "preset.json")],
             "records over json by a link": ["--json", str(tmp_path / "run.json"),
                                             "--records-out", str(inputs / "link.json")],
             "json over data": ["--json", data],
             "records over data": ["--records-out", data],
             "export over data": ["--export-delta", str(tmp_path)],
             "json in export": ["--export-delta", str(out / "ed"), "--json",
                                str(out / "ed" / "run.json")],
             "export beside json": ["--export-delta", str(out / "x"), "--json", str(out / "x")],
             "plot suffix": ["--plot", str(out / "p.xyz")],
             "export under a file": ["--export-delta", data + "/d"]}[case]
    if case == "plot suffix":
        pytest.importorskip("matplotlib")
    args = ["run", "--model", model_dir, "--data", data, "--turns", "1", "--edits-per-turn",
            "2", "--no-progress", "--threads", "1", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ultraedit run: error:") and "Traceback" not in err
    assert open(data).read() == before and list(out.iterdir()) == []
    assert {p.name: p.read_bytes() for p in inputs.iterdir() if not p.is_symlink()} == kept
    assert not (tmp_path / "run.json").exists()


def test_a_damaged_model_file_is_a_one_line_error(model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    data = _write(tmp_path / "zsre.json", ZSRE)
    assert main(["run", "--model", str(broken), "--data", data, "--turns", "1",
                 "--edits-per-turn", "2", "--no-progress", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ultraedit run: error: cannot load model") and "Traceback" not in err


def test_modules_that_match_nothing_write_no_records(model_dir, tmp_path, capsys):
    """A module list the model refuses fails once the model is there, before the records are
    selected and written."""
    data = _write(tmp_path / "zsre.json", ZSRE)
    out = tmp_path / "recs.jsonl"
    args = ["run", "--model", model_dir, "--data", data, "--turns", "1", "--edits-per-turn",
            "2", "--no-progress", "--threads", "1", "--modules", "nosuch",
            "--records-out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "no module" in err and "nosuch" in err and "Traceback" not in err
    assert not out.exists()


def test_a_preset_tuned_through_another_wording_is_noted(model_dir, tmp_path, capsys,
                                                        monkeypatch):
    import json

    import ultraedit.models

    def stop(*a, **k):
        raise OSError("stopped after the checks")

    monkeypatch.setattr(ultraedit.models, "load_model", stop)
    preset = tmp_path / "tuned.json"
    preset.write_text(json.dumps({"name": "tuned", "config": {"lr": 1e-4},
                                  "tuning": {"edit_wordings": "question"}}))
    data = _write(tmp_path / "zsre.json", ZSRE)
    args = ["run", "--model", model_dir, "--data", data, "--turns", "1", "--edits-per-turn", "2",
            "--no-progress", "--threads", "1", "--preset", str(preset)]
    assert main(args) == 2
    assert (f"note: the preset {preset} was tuned through --edit-wordings question; this run "
            f"edits through prompt") in capsys.readouterr().err
    assert main(args + ["--edit-wordings", "question"]) == 2
    assert "note: the preset" not in capsys.readouterr().err


def test_same_file_for_two_outputs_is_refused(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "zsre.json", ZSRE)
    assert main(_base(model_dir, data, tmp_path, "--plot", str(tmp_path / "r.json"))) == 2
    _one_line_error(capsys, "--json", "--plot")
    assert not (tmp_path / "r.json").exists()


def _interrupt_the_second_turn(monkeypatch) -> None:
    """``UltraEditor.edit`` raises KeyboardInterrupt (Ctrl-C) on its second call."""
    from ultraedit.editor import UltraEditor

    real_edit, calls = UltraEditor.edit, []

    def edit(self, requests):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_edit(self, requests)

    monkeypatch.setattr(UltraEditor, "edit", edit)


def test_interrupt_marks_the_json_interrupted(model_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the second turn: exit 130, one line, the JSON keeps turn 1 and says so."""
    data = _write(tmp_path / "zsre.json", ZSRE)
    _interrupt_the_second_turn(monkeypatch)
    assert main(_base(model_dir, data, tmp_path)) == 130
    assert "interrupted" in capsys.readouterr().err
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["status"] == "interrupted" and len(out["turns"]) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_progress_per_step_and_per_evaluation_batch(model_dir, tmp_path, capsys):
    """The bars move per micro-batch of every step of a turn and per evaluation batch (the
    per-turn and the final evaluation), and the one-time preserved-key capture is announced."""
    data = _write(tmp_path / "counterfact.json", COUNTERFACT)
    args = [a for a in _base(model_dir, data, tmp_path, "--format", "counterfact", "--steps", "3",
                             "--micro-batch", "1", "--positions", "subject", "--preserve", "1",
                             "--no-hold-done") if a != "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    for step in (1, 2, 3):
        for batch in (1, 2):
            assert f"turn 2/2, step {step}/3, micro-batch {batch}/2" in err, (step, batch)
    assert "unedited locality reference" in err
    assert "evaluating turn 1" in err and "evaluating turn 2" in err
    final = [ln for ln in err.replace("\r", "\n").splitlines() if "final evaluation" in ln]
    assert len(final) > 2                    # the final evaluation moves, batch by batch
    assert "capturing the preserved subjects' keys" in err
    assert err.index("capturing the preserved") < err.index("editing")


def test_a_cached_preserved_capture_is_not_announced_as_a_capture(model_dir, tmp_path, capsys,
                                                                   monkeypatch):
    """The first run captures the preserved keys and says so; the second reads them from the
    cache and says that instead."""
    monkeypatch.setenv("ULTRAEDIT_PRESERVED_CACHE", str(tmp_path / "cache"))
    data = _write(tmp_path / "counterfact.json", COUNTERFACT)
    args = [a for a in _base(model_dir, data, tmp_path, "--format", "counterfact",
                             "--positions", "subject", "--preserve", "1")
            if a != "--no-progress"]
    errs = []
    for _ in range(2):
        assert main(args) == 0
        errs.append(capsys.readouterr().err)
    assert "capturing the preserved subjects' keys" in errs[0]
    assert "preserved subjects' keys captured in" in errs[0]
    assert "capturing the preserved" not in errs[1]
    assert "preserved subjects' keys read from the cache in" in errs[1]


def test_no_progress_silences_a_long_preserved_capture(model_dir, tmp_path, capsys):
    """More than 256 preserved subjects show a capture bar, except under --no-progress."""
    data = _write(tmp_path / "counterfact.json", COUNTERFACT)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"Name{i:03d}" for i in range(300)) + "\n")
    args = _base(model_dir, data, tmp_path, "--format", "counterfact", "--positions", "subject",
                 "--preserve", "1", "--preserve-subjects", f"@{names}")
    for quiet in (True, False):
        assert main(args if quiet else [a for a in args if a != "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert ("preserved subject keys" in err) is not quiet, err[-500:]


def test_preset_and_the_recorded_config_reproduce_a_run(model_dir, tmp_path, capsys):
    """The run JSON records EditConfig.to_dict() (modules resolved); given back as --preset FILE
    it edits the same way. An unknown preset is a one-line error."""
    from ultraedit.config import EditConfig

    data = _write(tmp_path / "zsre.json", ZSRE)
    assert main(_base(model_dir, data, tmp_path, "--preset", "official", "--lr", "1e-3",
                      "--eval", "end", "--no-generation")) == 0
    first = json.loads((tmp_path / "r.json").read_text())
    cfg = first["edit_config"]
    assert EditConfig.from_dict(cfg) == EditConfig.official(lr=1e-3, modules=cfg["modules"])
    assert first["config"]["preset"] == "official"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    args = _base(model_dir, data, tmp_path, "--preset", str(tmp_path / "cfg.json"), "--eval",
                 "end", "--no-generation")
    args[args.index("--json") + 1] = str(tmp_path / "again.json")
    assert main(args) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["edit_config"] == cfg
    assert again["final"] == first["final"]
    assert [t["loss"] for t in again["turns"]] == [t["loss"] for t in first["turns"]]
    capsys.readouterr()
    assert main(_base(model_dir, data, tmp_path, "--preset", "nope")) == 2
    _one_line_error(capsys, "nope")
    assert main(_base(model_dir, data, tmp_path, "--steps", "0")) == 2
    _one_line_error(capsys, "steps")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_leaves_an_interrupted_json(model_dir, tmp_path, sig):
    """A real SIGINT (Ctrl-C) or SIGTERM (a scheduler, ``timeout``) to a running ``ultraedit
    run``: exit 130, one line, and the JSON keeps the finished turns with ``"status":
    "interrupted"``."""
    import signal
    import subprocess
    import sys
    import time

    rows = [{**ZSRE[i % 4], "subject": f"S{i}", "src": f"What is the capital of S{i}?"}
            for i in range(4000)]
    data = _write(tmp_path / "many.json", rows)
    out = tmp_path / "r.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(root, "python"), root])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ultraedit.cli", "run", "--model", model_dir, "--data", data,
         "--turns", "2000", "--edits-per-turn", "2", "--eval", "every", "--no-progress",
         "--threads", "1", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # a test runner started as a background job ignores SIGINT, and a child that inherits
        # SIG_IGN never sees Ctrl-C: give it the default disposition a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if json.loads(out.read_text())["turns"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "ultraedit run: interrupted")
    result = json.loads(out.read_text())
    assert result["status"] == "interrupted" and 1 <= len(result["turns"]) < 2000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_offline_run_leaves_out_the_excluded_subjects(model_dir, tmp_path, monkeypatch, capsys):
    """--data offline --exclude-subjects FILE: the listed subjects are never edited (the known-
    fact filter is stubbed: the tiny model knows nothing); a missing file is a one-line error."""
    import ultraedit.eval.facts as facts
    from ultraedit.data import load_records, offline_facts

    monkeypatch.setattr(facts, "filter_known", lambda recs, *a, **k: list(recs))
    first = [r.subject for r in offline_facts(("capital",))[:50]]
    (tmp_path / "skip.txt").write_text("# tuned on\n" + "\n".join(first) + "\n")
    out = tmp_path / "records.jsonl"
    args = ["run", "--model", model_dir, "--data", "offline", "--relations", "capital",
            "--turns", "1", "--edits-per-turn", "4", "--eval", "end", "--no-generation",
            "--no-progress", "--threads", "1", "--records-out", str(out)]
    assert main(args + ["--exclude-subjects", str(tmp_path / "skip.txt")]) == 0
    edited = {r.subject for r in load_records(str(out))}
    assert len(edited) == 4 and not edited & set(first)
    capsys.readouterr()
    assert main(args + ["--exclude-subjects", str(tmp_path / "missing.txt")]) == 2
    _one_line_error(capsys, "missing.txt")


def test_plot_without_matplotlib_fails_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    import ultraedit.models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(ultraedit.models, "load_model",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    data = _write(tmp_path / "zsre.json", ZSRE)
    assert main(_base(model_dir, data, tmp_path, "--plot", str(tmp_path / "r.png"))) == 2
    _one_line_error(capsys, "matplotlib")


def test_a_request_the_editor_refuses_is_a_one_line_error(model_dir, tmp_path, capsys):
    """A record too long for the model's context, in the second turn: exit 2 with the message
    naming the file and record before the first turn (every record's requests are checked
    first), and the earlier results at --json and --records-out are left as they were."""
    rows = [dict(r) for r in ZSRE]
    rows[2]["subject"] = "Atlantis"     # not in its prompt: refused at subject positions
    data = _write(tmp_path / "subject.json", rows)
    (tmp_path / "r.json").write_text("earlier results")
    (tmp_path / "recs.jsonl").write_text("earlier records")
    for flag in ("--true-facts", "--no-true-facts"):
        assert main(_base(model_dir, data, tmp_path, "--eval", "end", flag, "--positions",
                          "subject", "--records-out", str(tmp_path / "recs.jsonl"))) == 2
        _one_line_error(capsys, f"{data}: record 2 (turn 2): ", "Atlantis")
        assert (tmp_path / "r.json").read_text() == "earlier results"
        assert (tmp_path / "recs.jsonl").read_text() == "earlier records"


def test_subject_positions_are_checked_in_the_wordings_the_editor_gets(model_dir, tmp_path,
                                                                       capsys):
    """A record whose question does not name its subject can be edited at the subject through
    its cloze prompt, not through its question: the run switches to answer positions first."""
    from ultraedit.config import EditConfig

    rows = [{"prompt": f"The capital of {c} is", "target": t, "subject": c,
             "questions": {f"The capital of {c} is": f"Which city is seat {i} of government?"}}
            for i, (c, t) in enumerate((("France", "Rome"), ("Spain", "Oslo"), ("Peru", "Lima"),
                                        ("Chad", "Bern")))]
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EditConfig(positions="subject", modules=("model.layers.1.mlp.down_proj",)).to_dict()
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    for wordings, positions in (("prompt", "subject"), ("question", "answer")):
        assert main(_base(model_dir, str(data), tmp_path, "--format", "records", "--preset",
                          str(tmp_path / "cfg.json"), "--eval", "end", "--no-generation",
                          "--no-wild", "--no-true-facts", "--edit-wordings", wordings)) == 0
        out = json.loads((tmp_path / "r.json").read_text())
        assert out["edit_config"]["positions"] == positions, wordings
        assert ("no subject in their prompt" in capsys.readouterr().err) is (positions == "answer")


def test_per_turn_options_without_a_per_turn_evaluation_are_refused(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "zsre.json", ZSRE)
    assert main(_base(model_dir, data, tmp_path, "--eval", "end", "--turn-wild")) == 2
    _one_line_error(capsys, "--turn-wild and --turn-generation", "--eval every or both")


def test_a_delta_device_that_cannot_exist_is_refused_before_the_model_loads(
        model_dir, tmp_path, capsys, monkeypatch):
    import ultraedit.models

    monkeypatch.setattr(ultraedit.models, "load_model",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    data = _write(tmp_path / "zsre.json", ZSRE)
    assert main(_base(model_dir, data, tmp_path, "--delta-device", "gpu9")) == 2
    _one_line_error(capsys, "delta_device='gpu9' is not a device")


def test_eval_every_prints_each_turns_scores_and_records_what_was_scored(model_dir, tmp_path,
                                                                          capsys):
    data = _write(tmp_path / "zsre.json", ZSRE)
    assert main(_base(model_dir, data, tmp_path, "--eval", "every")) == 0
    printed = capsys.readouterr().out
    assert "turn 1" in printed and "turn 2" in printed
    config = json.loads((tmp_path / "r.json").read_text())["config"]
    assert config["wild"] is False and config["generation"] is False


def test_a_model_without_a_measured_preset_is_told_so(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "zsre.json", ZSRE)
    assert main(_base(model_dir, data, tmp_path, "--eval", "end", "--no-wild")) == 0
    assert "note: no measured preset for this llama model" in capsys.readouterr().err
    assert main(_base(model_dir, data, tmp_path, "--eval", "end", "--no-wild", "--lr", "1e-3")) == 0
    assert "no measured preset" not in capsys.readouterr().err


def test_a_paraphrase_longer_than_the_model_is_named_before_any_work(model_dir, tmp_path, capsys):
    rows = [dict(r) for r in ZSRE]
    rows[1]["rephrase"] = "Which " + "big " * 80 + "city is the capital?"
    data = _write(tmp_path / "long.json", rows)
    assert main(_base(model_dir, data, tmp_path)) == 2
    _one_line_error(capsys, f"{data}: record 1: its paraphrases[0]", "longer than the model's")
    assert not (tmp_path / "r.json").exists()


def test_a_run_stopped_after_a_turn_resumes_to_the_same_edit(model_dir, tmp_path, capsys,
                                                             monkeypatch):
    """--save-state after every turn; Ctrl-C in turn 2; --resume continues with turn 2 and ends
    with the same weights and final scores as the run that was never stopped."""
    import torch

    from ultraedit.editor import UltraEditor
    from ultraedit.serialization import read_dir

    data = _write(tmp_path / "zsre.json", ZSRE)
    common = ["--eval", "end", "--no-wild", "--lr", "1e-2"]
    assert main(_base(model_dir, data, tmp_path, *common, "--export-delta",
                      str(tmp_path / "whole"))) == 0
    whole = json.loads((tmp_path / "r.json").read_text())
    state = tmp_path / "state"
    real_edit = UltraEditor.edit
    _interrupt_the_second_turn(monkeypatch)
    assert main(_base(model_dir, data, tmp_path, *common, "--save-state", str(state))) == 130
    monkeypatch.setattr(UltraEditor, "edit", real_edit)
    manifest, _ = read_dir(state, "state")
    assert manifest["turns"] == 1 and manifest["meta"]["edits_per_turn"] == 2
    capsys.readouterr()
    # the editing options belong to the state now
    assert main(_base(model_dir, data, tmp_path, *common, "--resume", str(state))) == 2
    _one_line_error(capsys, "--resume continues with the saved state's editing settings",
                    "--lr")
    # other records are refused
    other = _write(tmp_path / "other.json", ZSRE[::-1])
    assert main(_base(model_dir, other, tmp_path, "--eval", "end", "--no-wild", "--resume",
                      str(state))) == 2
    _one_line_error(capsys, "saved by a run over other records")
    assert main(_base(model_dir, data, tmp_path, "--eval", "end", "--no-wild", "--resume",
                      str(state), "--save-state", str(state), "--export-delta",
                      str(tmp_path / "resumed"))) == 0
    resumed = json.loads((tmp_path / "r.json").read_text())
    assert resumed["resumed"] == {"turns_done": 1, "edits_done": 2}
    assert (resumed["state"]["path"], resumed["state"]["turns"]) == (str(state), 2)
    assert [r["turn"] for r in resumed["turns"]] == [2]
    assert resumed["final"]["teacher_forced"] == whole["final"]["teacher_forced"]
    a, b = (read_dir(tmp_path / d, "delta")[1]["delta.safetensors"] for d in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_dir(state, "state")[0]["turns"] == 2


def test_an_output_inside_the_state_folder_is_refused_before_loading(model_dir, tmp_path, capsys,
                                                                     monkeypatch):
    import ultraedit.models

    monkeypatch.setattr(ultraedit.models, "load_model",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "st").mkdir()     # empty: a state may be written there
    data = _write(tmp_path / "zsre.json", ZSRE)
    args = ["run", "--model", model_dir, "--data", data, "--turns", "2", "--edits-per-turn", "2",
            "--no-progress", "--save-state", "st", "--json", os.path.join("st", "r.json")]
    assert main(args) == 2
    _one_line_error(capsys, "lies in --save-state")


def test_a_finished_run_continues_with_more_turns(model_dir, tmp_path, capsys):
    """--resume with a larger --turns edits the records after the state's: the same edit as one
    run over all the turns; a smaller --turns, or another turn size, is named."""
    import torch

    from ultraedit.serialization import read_dir

    data = _write(tmp_path / "zsre.json", ZSRE)
    common = ["--eval", "end", "--no-wild", "--edits-per-turn", "1"]
    assert main(_base(model_dir, data, tmp_path, *common, "--lr", "1e-2", "--turns", "4",
                      "--export-delta", str(tmp_path / "whole"))) == 0
    whole = json.loads((tmp_path / "r.json").read_text())
    state = str(tmp_path / "state")
    assert main(_base(model_dir, data, tmp_path, *common, "--lr", "1e-2",
                      "--save-state", state)) == 0
    capsys.readouterr()
    assert main(_base(model_dir, data, tmp_path, *common, "--turns", "1", "--resume", state)) == 2
    _one_line_error(capsys, "the state has made 2 turns, more than --turns 1")
    assert main(_base(model_dir, data, tmp_path, "--eval", "end", "--no-wild", "--resume",
                      state)) == 2
    _one_line_error(capsys, "saved by a run with --edits-per-turn 1; give the same")
    assert main(_base(model_dir, data, tmp_path, *common, "--resume", state)) == 0
    assert "no turn was left to edit" in capsys.readouterr().out
    assert main(_base(model_dir, data, tmp_path, *common, "--turns", "4", "--resume", state,
                      "--save-state", state, "--export-delta", str(tmp_path / "more"))) == 0
    more = json.loads((tmp_path / "r.json").read_text())
    assert [r["turn"] for r in more["turns"]] == [3, 4]
    assert more["final"]["teacher_forced"] == whole["final"]["teacher_forced"]
    a, b = (read_dir(tmp_path / d, "delta")[1]["delta.safetensors"] for d in ("whole", "more"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_dir(state, "state")[0]["meta"]["edited_records"] == 4


def test_the_run_json_rewrites_after_turns_cost_a_bounded_share(tmp_path, monkeypatch):
    """Stage changes are always written; per-turn rewrites wait 1/share times the last write's
    cost (a JSON that grows with the turns was rewritten in full after each one)."""
    from ultraedit.cli import _common

    clock, written = [0.0], []

    def write(result, path):
        written.append(result["status"])
        clock[0] += 1.0          # every write costs one second

    monkeypatch.setattr(_common.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(_common, "write_json", write)
    writer = _common.RunJsonWriter(str(tmp_path / "r.json"), share=0.1)
    writer({"status": "unedited locality reference"})
    for turn in range(1, 41):
        clock[0] += 1.0          # a turn takes one second
        writer({"status": f"turn {turn} of 40"})
    writer({"status": "final evaluation"})
    writer({"status": "done"})
    turns = [s for s in written if s.startswith("turn ")]
    assert written[0] == "unedited locality reference" and written[-2:] == ["final evaluation",
                                                                          "done"]
    assert 2 <= len(turns) <= 40 * 0.1 + 1     # about one in ten seconds, not one per turn
    _common.RunJsonWriter(None)({"status": "done"})    # no --json: nothing
    assert len(written) == len(turns) + 3


def test_a_state_saved_with_the_whole_runs_digest_still_resumes_its_run():
    """States saved before the digest covered the edited records hash the whole run's records:
    the same records resume, others are refused."""
    import argparse

    from ultraedit.cli._common import UsageError
    from ultraedit.cli.resume import _whole_run_digest, check_resumed_run
    from ultraedit.data.formats import map_record

    records = [map_record(r, "zsre") for r in ZSRE]
    args = argparse.Namespace(resume="st", edits_per_turn=2, edit_wordings="prompt", turns=2)
    manifest = {"turns": 1, "meta": {"records_sha256": _whole_run_digest(records),
                                     "edits_per_turn": 2, "edit_wordings": "prompt"}}
    check_resumed_run(args, manifest, records)
    with pytest.raises(UsageError, match="over other records"):
        check_resumed_run(args, manifest, records[::-1])

"""The ``ultraedit demo`` command: argument parsing and a small run on the embedded model."""
import json

import pytest

from ultraedit.cli import build_parser, main
from ultraedit.cli.options import given_options
from ultraedit.data.records import drop_edited_locality as _drop_edited_locality


def test_parser_defaults_and_options():
    args = build_parser().parse_args(["demo"])
    assert (args.turns, args.edits_per_turn, args.model, args.json, args.seed) == (2, 50, None, None, 0)
    assert (args.preset, given_options(args)) == (None, {})     # the model's preset, unchanged
    args = build_parser().parse_args(["demo", "--turns", "3", "--edits-per-turn", "7", "--lr", "1e-4",
                                      "--modules", "a,b", "--model", "/m", "--json", "o.json"])
    assert (args.turns, args.edits_per_turn, args.model) == (3, 7, "/m")
    assert given_options(args) == {"lr": 1e-4, "modules": ["a", "b"]}
    args = build_parser().parse_args(["demo", "--steps", "4", "--positions", "answer", "--memory",
                                      "0", "--no-hold-done", "--preserve", "2", "--preset", "paper"])
    assert args.preset == "paper"
    assert given_options(args) == {"steps": 4, "positions": "answer", "memory": 0.0,
                                   "hold_done": False, "preserve": 2.0}
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


@pytest.mark.parametrize("command", ["demo", "run"])
def test_method_flags_are_the_config_fields(command, tmp_path):
    """One flag per EditConfig field; the parsed flags rebuild the config they spell."""
    import dataclasses

    from ultraedit.config import EditConfig

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    flags = {o for a in sub._actions for o in a.option_strings}
    for f in dataclasses.fields(EditConfig):
        assert "--" + f.name.replace("_", "-") in flags, f.name
    (tmp_path / "subjects.txt").write_text("Paris\nJapan\n")
    args = parser.parse_args([command, "--lr", "2e-5", "--ridge", "3", "--micro-batch", "auto",
                              "--compat", "fixed", "--normalizer", "module", "--accumulate",
                              "false", "--history", "2", "--protect-mean", "0.5", "--steps", "3",
                              "--hold-done", "--positions", "subject", "--memory", "1",
                              "--preserve", "0.3", "--preserve-subjects",
                              f"@{tmp_path / 'subjects.txt'}", "--preserve-contexts",
                              "{s} is,I saw {s}", "--modules", "x.y,re:z",
                              "--memory-budget-gib", "6", "--key-contexts", "2",
                              "--whiten", "0.01", "--backward-group", "3", "--recheck", "4", "--pack", "off",
                              "--hold-margin", "1.5", "--matmul-dtype", "bfloat16"])
    given = given_options(args)
    assert set(given) == set(EditConfig.field_names()) - {"delta_device"}
    cfg = EditConfig.from_dict(given)
    assert cfg.preserve_subjects == ("Paris", "Japan") and cfg.accumulate is False
    assert cfg.preserve_contexts == ("{s} is", "I saw {s}") and cfg.modules == ("x.y", "re:z")
    assert cfg.micro_batch == "auto" and cfg.memory_budget_gib == 6.0 and cfg.key_contexts == 2
    assert cfg.backward_group == 3 and cfg.pack == "off"
    assert cfg.whiten == 0.01 and cfg.recheck == 4 and cfg.hold_margin == 1.5
    assert cfg.matmul_dtype == "bfloat16"


@pytest.mark.parametrize("args, needle", [
    (["--json", "{tmp}"], "is a folder"),
    (["--json", "{tmp}/no/such/out.json"], "does not exist"),
    (["--threads", "-1"], "--threads"),
    (["--turns", "0"], "--turns"),
    (["--relations", "capital,nope"], "nope"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, monkeypatch, args, needle):
    """Checked before the model loads: exit 2, one line, nothing written."""
    import ultraedit.models

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(ultraedit.models, "load_model", no_work)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["demo", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ultraedit demo: error: ") and needle in err
    assert list(tmp_path.iterdir()) == []


def test_edited_prompts_are_not_locality():
    from ultraedit.data.records import EditRecord
    a = EditRecord(prompt="The capital of A is", target="X", paraphrases=["A's capital is"],
                   locality=[("The capital of B is", "Y"), ("The capital of C is", "Z")])
    b = EditRecord(prompt="The capital of B is", target="W", locality=[("A's capital is", "Q")])
    out = _drop_edited_locality([a, b])
    assert [lp.prompt for lp in out[0].locality] == ["The capital of C is"]
    assert out[1].locality == []


@pytest.mark.embedded
def test_demo_small_run(tmp_path, ue_embedded, capsys):
    path = tmp_path / "out.json"
    rc = main(["demo", "--turns", "2", "--edits-per-turn", "3", "--json", str(path),
               "--no-progress", "--threads", "1"])
    assert rc == 0
    data = json.loads(path.read_text())
    before, after = data["metrics"]["before"], data["metrics"]["after"]
    assert set(before) == set(after) == {"es", "gs", "ls", "gs_known"}
    assert all(0.0 <= s[k] <= 1.0 for s in (before, after) for k in ("es", "gs", "ls"))
    true = data["true_facts"]             # the unedited model on the true answers, by default
    assert true["n"] == 6 and true["es"] == 1.0 and 0.0 <= true["gs"] <= 1.0   # facts it knows
    assert 0 <= true["known_paraphrases"] and 0.0 <= true["wild_es_contains"] <= 1.0
    assert after["es"] >= before["es"] + 0.3
    assert data["edits"] == 6 and data["machine"]["threads"] == 1
    assert {"loadavg_start", "loadavg_end"} <= set(data["machine"])
    assert len(data["timing"]["turn_s"]) == len(data["timing"]["fwd_bwd_s"]) == 2
    assert data["memory"]["peak_bytes"] > 0
    assert data["edit_config"]["preserve"] == 0.3 and data["timing"]["preserve_s"] > 0
    assert data["edit_config"]["modules"][0] == "model.layers.2.mlp.down_proj"
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "forward+backward" in out
    assert "TRUE answers, unedited" in out
    how = "read from the cache" if data["timing"]["preserve_cached"] else "captured once"
    assert f"preserved subjects' keys {how}" in out
    wild = data["wild"]["after"]                       # WILD-style, on by default
    assert all(0.0 <= wild[k] <= 1.0 for k in ("es", "gs", "ls", "es_contains", "gs_contains"))
    assert wild["examples"][0]["prompt"].startswith("Q: ") and data["timing"]["wild_s"] > 0
    assert "WILD-style exact" in out


def test_demo_edits_through_the_questions(tmp_path, ue_embedded):
    path = tmp_path / "out.json"
    assert main(["demo", "--turns", "1", "--edits-per-turn", "2", "--json", str(path),
                 "--no-progress", "--threads", "1", "--no-true-facts", "--no-wild",
                 "--edit-wordings", "question"]) == 0
    data = json.loads(path.read_text())
    assert data["edit_wordings"] == "question" and data["edits"] == 2
    assert build_parser().parse_args(["demo"]).edit_wordings == "prompt"


def test_the_summary_line_names_a_hold_margin():
    from ultraedit.cli.demo import settings_line
    from ultraedit.config import EditConfig

    cfg = EditConfig.from_preset("smollm2-135m", modules=["m.2", "m.3"]).to_dict()
    assert settings_line(cfg) == ("lr=5e-05, 12 steps, subject positions, memory=4, preserve=0.3, "
                                  "whiten=0.001, 2 modules (m.2 ...)")
    cfg = EditConfig.from_preset("smollm2-135m-lifelong", modules=["m.2"]).to_dict()
    assert settings_line(cfg).startswith("lr=3.5e-05, 12 steps held to a logit margin of 1, "
                                         "held ones re-checked every 4, subject positions, ")
    assert settings_line(cfg).endswith(", 1 module (m.2)")
    cfg = EditConfig.from_preset("paper", modules=["m.2"]).to_dict()
    assert settings_line(cfg).startswith("lr=1e-06, 1 step, answer positions, ")

"""``ultraedit tune`` on a tiny random-init llama: a budgeted search that writes a preset which
``EditConfig.from_preset`` / ``--preset FILE`` and ``EditConfig.for_model`` load, chosen by the
recorded rule, on tuning relations only; a bad output path is refused before any work."""

import json

import pytest

from conftest import ue_tiny_model

# a small grid for a random model: large steps (it knows nothing), no preserved-key captures
GRID = {"lr": [1e-2, 1e-1], "steps": [1, 2], "memory": [0.0, 1.0], "preserve": [0.0],
        "protect_mean": [0.0]}


@pytest.fixture(scope="module")
def tiny(ue_tokenizer):
    return ue_tiny_model("llama", len(ue_tokenizer)), ue_tokenizer


@pytest.fixture(scope="module")
def facts():
    from ultraedit.data import offline_facts

    return offline_facts(("capital",), seed=0, limit=8, n_locality=2,
                         split="tuning")


@pytest.fixture(scope="module")
def searched(tiny, facts):
    from ultraedit.tune import tune

    model, tok = tiny
    lines = []
    result = tune(model, tok, budget_s=120, seed=3, ls_target=0.5, turns=2, edits_per_turn=4,
                  eta=2, rounds=2, candidates=6, records=facts, grid=GRID, name="tiny-tuned",
                  log=lines.append)
    return result, lines


def test_search_runs_the_schedule_and_records_it(searched):
    result, lines = searched
    t = result.preset["tuning"]
    assert result.stopped == t["stopped"] == "done"
    assert t["schedule"] == [{"candidates": 6, "edits_per_turn": 2},
                             {"candidates": 3, "edits_per_turn": 4}]
    by_round = [[r for r in t["candidates"] if r["round"] == k] for k in (0, 1)]
    assert [len(rows) for rows in by_round] == [6, 3]
    assert [r["edits"] for r in by_round[0]] == [4] * 6 and {r["edits"] for r in by_round[1]} == {8}
    for row in t["candidates"]:
        assert 0 <= row["es"] <= 1 and 0 <= row["ls"] <= 1 and row["wall_s"] > 0
        assert row["passes"] >= row["steps_run"] >= 1
    # candidate 0 is the model's current config; the survivors: round 0's best by the rule and
    # its ES/LS trade-offs
    from ultraedit.tune import rank_key, survivors

    assert by_round[0][0]["source"] == "current"
    kept = survivors(by_round[0], 3, 0.5)
    assert [r["candidate"] for r in by_round[1]] == [r["candidate"] for r in kept]
    assert kept[:2] == sorted(by_round[0], key=lambda r: rank_key(r, 0.5))[:2]
    assert 0 in [r["candidate"] for r in kept]
    assert t["space"]["lr"] == GRID["lr"] and t["space"]["n_layers"] == 3
    assert t["space"]["whiten"] == [0.0, 0.001]   # not in GRID: the default values
    assert t["space"]["hold_margin"] == [0.0, 1.0]
    for row in t["candidates"]:
        assert row["config"]["whiten"] in (0.0, 0.001)
        assert row["config"]["hold_margin"] in (0.0, 1.0)
        assert row["config"]["hold_done"] or not row["config"]["hold_margin"]
    assert t["rule"].startswith("the highest teacher-forced ES") and "0.5" in t["rule"]
    assert lines[0].startswith("rule (fixed before the search)")
    assert sum(ln.startswith("[round") for ln in lines) == 9


def test_the_pick_follows_the_rule(searched):
    result, _ = searched
    t = result.preset["tuning"]
    last = [r for r in t["candidates"] if r["round"] == 1]
    feasible = [r for r in last if r["ls"] >= 0.5]
    chosen = result.chosen
    assert chosen["round"] == 1 and t["chosen"] == chosen["candidate"]
    if feasible:
        assert chosen["ls"] >= 0.5 and t["met_target"] is True
        assert chosen["es"] == max(r["es"] for r in feasible)
    else:   # none meets it: candidate 0 unless rows beat it on both ES and LS
        from ultraedit.tune import beats
        better = [r for r in last if beats(r, next(c for c in last if c["candidate"] == 0))]
        assert t["met_target"] is False
        assert chosen["ls"] == max(r["ls"] for r in better) if better else chosen["candidate"] == 0
    assert result.preset["config"] == {k: v for k, v in chosen["config"].items()}


def test_rule_ties_and_infeasible_rows():
    from ultraedit.tune import choose

    rows = [{"candidate": 0, "es": 0.9, "ls": 0.80, "passes": 2},
            {"candidate": 1, "es": 0.7, "ls": 0.90, "passes": 9},
            {"candidate": 2, "es": 0.7, "ls": 0.95, "passes": 4},
            {"candidate": 3, "es": 0.6, "ls": 0.99, "passes": 1}]
    assert choose(rows, 0.85)["candidate"] == 2          # highest ES with LS >= 0.85, cheaper
    assert choose(rows, 0.5)["candidate"] == 0
    assert choose(rows, 0.999)["candidate"] == 0         # none meets it, none beats candidate 0
    assert choose([], 0.85) is None
    # none meets the target: of the rows that beat candidate 0 on both, the highest LS
    rows = [{"candidate": 0, "es": 0.5, "ls": 0.60, "passes": 2},
            {"candidate": 1, "es": 0.9, "ls": 0.40, "passes": 2},    # more ES, less LS
            {"candidate": 2, "es": 0.6, "ls": 0.70, "passes": 2},    # beats 0
            {"candidate": 3, "es": 0.5, "ls": 0.75, "passes": 2},    # beats 0 (equal ES)
            {"candidate": 4, "es": 0.1, "ls": 0.80, "passes": 2}]    # the highest LS: a no-op
    assert choose(rows, 0.85)["candidate"] == 3
    assert choose(rows[:2] + rows[4:], 0.85)["candidate"] == 0
    # without candidate 0 (or with it failed): the highest LS, as rank_key orders
    assert choose(rows[1:], 0.85)["candidate"] == 4
    failed0 = [dict(rows[0], error="ValueError: x", es=None, ls=None)] + rows[1:]
    assert choose(failed0, 0.85)["candidate"] == 4


def test_trade_offs_are_the_rows_nothing_beats_on_both():
    from ultraedit.tune import trade_offs

    rows = [{"candidate": 0, "es": 0.2, "ls": 0.97},
            {"candidate": 1, "es": 0.9, "ls": 0.50},
            {"candidate": 2, "es": 0.6, "ls": 0.60},
            {"candidate": 3, "es": 0.5, "ls": 0.55},       # beaten by #2 on both
            {"candidate": 4, "es": 0.6, "ls": 0.60},       # #2's twin: the earlier one stays
            {"candidate": 5, "es": None, "ls": None, "error": "ValueError: ..."}]
    assert [r["candidate"] for r in trade_offs(rows)] == [1, 2, 0]
    assert trade_offs([]) == []


def test_survivors_are_half_by_the_rule_the_current_config_and_trade_offs():
    from ultraedit.tune import survivors

    rows = [{"candidate": 0, "es": 0.20, "ls": 0.97, "passes": 2},
            {"candidate": 1, "es": 0.25, "ls": 0.90, "passes": 2},
            {"candidate": 2, "es": 0.22, "ls": 0.88, "passes": 2},
            {"candidate": 3, "es": 0.95, "ls": 0.55, "passes": 9},
            {"candidate": 4, "es": 0.70, "ls": 0.70, "passes": 9},
            {"candidate": 5, "es": 0.60, "ls": 0.60, "passes": 9},
            {"candidate": 6, "es": None, "ls": None, "passes": 0, "error": "ValueError: x"}]
    # the rule (LS >= 0.85) alone would keep the near no-ops 1, 2, 0; candidate 0 (the current
    # config) always goes on
    assert [r["candidate"] for r in survivors(rows, 4, 0.85)] == [1, 2, 0, 3]
    assert [r["candidate"] for r in survivors(rows, 5, 0.85)] == [1, 2, 0, 3, 4]
    assert [r["candidate"] for r in survivors(rows, 2, 0.85)] == [1, 0]
    assert [r["candidate"] for r in survivors(rows, 7, 0.85)] == [1, 2, 0, 4, 3, 5]
    assert [r["candidate"] for r in survivors(rows, 3, 0.5)] == [3, 4, 0]
    assert [r["candidate"] for r in survivors(rows[1:], 3, 0.5)] == [3, 4, 1]


def test_the_record_has_each_rounds_trade_offs(searched):
    from ultraedit.tune import WEAK_GAIN, trade_offs

    result, lines = searched
    t = result.preset["tuning"]
    assert [f["round"] for f in t["trade_offs"]] == [0, 1]
    for front in t["trade_offs"]:
        rows = [r for r in t["candidates"] if r["round"] == front["round"]]
        assert [r["candidate"] for r in front["rows"]] == [r["candidate"]
                                                            for r in trade_offs(rows)]
        assert front["edits"] == rows[0]["edits"]
    assert sum(ln.startswith("ES/LS trade-offs of round") for ln in lines) == 2
    base = [r for r in t["candidates"] if r["round"] == result.chosen["round"]
            and r["candidate"] == 0]
    weak = bool(base) and result.chosen["candidate"] != 0 and \
        result.chosen["es"] - base[0]["es"] < WEAK_GAIN
    assert t["weak_pick"] == weak
    assert any(ln.startswith("note: the pick edits") for ln in lines) == weak


def test_the_weak_pick_note_says_whether_the_pick_edits_more_or_less():
    from ultraedit.tune import weak_pick_note

    base = {"es": 0.889, "ls": 0.735}
    assert weak_pick_note(0.9, base, 0.85).startswith(
        "note: the pick edits barely more than the current config (#0, ES 0.889 LS 0.735)")
    assert weak_pick_note(0.519, base, 0.85).startswith("note: the pick edits less than")


def test_preset_loads_by_file_and_by_fingerprint(searched, tiny, tmp_path, monkeypatch):
    from ultraedit.config import EditConfig, model_fingerprint
    from ultraedit.editor import UltraEditor
    from ultraedit.tune import write_preset

    result, _ = searched
    model, tok = tiny
    folder = tmp_path / "presets"
    folder.mkdir()
    path = folder / "tiny-tuned.json"
    write_preset(result.preset, path)
    data = json.loads(path.read_text())
    assert set(data) == {"name", "description", "fingerprint", "config", "tuning"}
    assert data["fingerprint"] == model_fingerprint(model) and data["name"] == "tiny-tuned"
    cfg = EditConfig.from_preset(str(path))
    assert cfg.lr == data["config"]["lr"] and list(cfg.modules) == data["config"]["modules"]
    assert EditConfig.for_model(model, presets=[folder]) == cfg
    assert EditConfig.for_model(model, presets=[path]) == cfg
    assert EditConfig.for_model(model) == EditConfig.paper()      # not found without a path
    monkeypatch.setenv("ULTRAEDIT_PRESETS", str(folder))
    assert EditConfig.for_model(model) == cfg
    assert UltraEditor(model, tok).config == cfg                   # the editor's default
    # another model's fingerprint does not match; a missing folder is named
    other = ue_tiny_model("llama", len(tok), intermediate=40)
    assert EditConfig.for_model(other) == EditConfig.paper()
    monkeypatch.setenv("ULTRAEDIT_PRESETS", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="ULTRAEDIT_PRESETS.*missing"):
        EditConfig.for_model(model)


def test_cli_preset_flag_loads_a_tune_output(searched, tiny, tmp_path):
    import argparse

    from ultraedit.cli.options import add_method_options, resolve
    from ultraedit.config import EditConfig
    from ultraedit.tune import write_preset

    result, _ = searched
    path = tmp_path / "t.json"
    write_preset(result.preset, path)
    p = argparse.ArgumentParser()
    add_method_options(p)
    cfg = resolve(p.parse_args(["--preset", str(path), "--ridge", "2"]), tiny[0])
    assert cfg == EditConfig.from_preset(str(path), ridge=2.0)


def test_tuning_relations_only(tiny, facts, monkeypatch):
    """Records of a report relation are refused; the facts drawn are of the tuning split."""
    import ultraedit.data as data
    from ultraedit.data import REPORT_RELATIONS, TUNING_RELATIONS, offline_facts
    from ultraedit.tune import tune, tuning_records

    model, tok = tiny
    report = offline_facts(("language",), limit=8, split="report")
    with pytest.raises(ValueError, match="not tuning relations"):
        tune(model, tok, budget_s=5, turns=1, edits_per_turn=8, records=report, grid=GRID)
    calls = []
    real = data.offline_facts

    def spy(relations=None, *a, **k):
        calls.append((tuple(relations), k.get("split")))
        return real(("capital",), *a, **{**k, "split": "tuning"})   # fast: one relation

    monkeypatch.setattr(data, "offline_facts", spy)
    recs = tuning_records(model, tok, 6, known=False)
    assert calls == [(TUNING_RELATIONS, "tuning")]
    assert len(recs) == 6 and not {r.relation for r in recs} & set(REPORT_RELATIONS)


def test_looking_for_known_facts_stops_at_its_deadline(tiny):
    """A model that knows too few tuning facts gets a clear error naming --no-known, not a search
    that eats the budget."""
    import time

    from ultraedit.tune import tuning_records

    model, tok = tiny
    with pytest.raises(ValueError, match=r"within the time allowed.*--no-known"):
        tuning_records(model, tok, 6, known=True, deadline=time.perf_counter() - 1.0)


def test_budget_stops_cleanly_with_the_best_so_far(tiny, facts):
    from ultraedit.tune import tune

    model, tok = tiny
    result = tune(model, tok, budget_s=1e-3, turns=2, edits_per_turn=2, eta=2, rounds=2,
                  records=facts, grid=GRID)
    assert result.stopped == "budget" and len(result.rows) == 1
    assert result.chosen["candidate"] == 0 and result.preset["config"]


def test_weights_are_restored_between_candidates(tiny, facts):
    import torch

    from ultraedit.tune import tune

    model, tok = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tune(model, tok, budget_s=60, turns=1, edits_per_turn=2, rounds=1, candidates=3,
         records=facts, grid=GRID)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("wordings", ["question", "both"])
def test_a_search_in_another_wording_edits_and_scores_through_it(tiny, facts, monkeypatch,
                                                                  tmp_path, wordings):
    import ultraedit.eval as ev
    from ultraedit.cli.options import preset_edit_wordings
    from ultraedit.editor import UltraEditor
    from ultraedit.tune import tune, write_preset

    model, tok = tiny
    edited, scored = [], []
    real_edit, real_evaluate = UltraEditor.edit, ev.evaluate_records

    def edit(self, requests, *args, **kwargs):
        edited.append([r["prompt"] for r in requests])
        return real_edit(self, requests, *args, **kwargs)

    def evaluate(model, tokenizer, records, **kwargs):
        scored.append([r.prompt for r in records])
        return real_evaluate(model, tokenizer, records, **kwargs)

    monkeypatch.setattr(UltraEditor, "edit", edit)
    monkeypatch.setattr(ev, "evaluate_records", evaluate)
    result = tune(model, tok, budget_s=60, turns=1, edits_per_turn=2, rounds=1, candidates=2,
                  records=facts, grid=GRID, wordings=wordings)
    asked = [f"Q: {r.questions[r.prompt]}\nA:" for r in facts[:2]]
    cloze = [r.prompt for r in facts[:2]]
    want_edit = asked if wordings == "question" else [p for pair in zip(cloze, asked) for p in pair]
    want_scored = asked if wordings == "question" else cloze + asked
    assert edited == [want_edit] * 2 and scored == [want_scored] * 2   # two candidates
    t = result.preset["tuning"]
    assert t["edit_wordings"] == wordings and "questions" in t["rule"]
    assert "questions" in result.preset["description"]
    path = tmp_path / "q.json"
    write_preset(result.preset, path)
    assert preset_edit_wordings(str(path)) == wordings
    assert preset_edit_wordings("smollm2-135m") is None


def test_a_search_through_questions_needs_records_that_ask_them(tiny):
    from ultraedit.data import EditRecord
    from ultraedit.tune import tune

    model, tok = tiny
    bare = [EditRecord(f"The capital of land {i} is", "Rome", subject=f"land {i}",
                       relation="capital", locality=["Berlin is in"]) for i in range(2)]
    with pytest.raises(ValueError, match="none of the 2 records asks its rewrite prompt"):
        tune(model, tok, budget_s=5, turns=1, edits_per_turn=2, records=bare, grid=GRID,
             wordings="question")
    with pytest.raises(ValueError, match="wordings must be one of"):
        tune(model, tok, budget_s=5, turns=1, edits_per_turn=2, records=bare, grid=GRID,
             wordings="cloze")


def test_bad_output_path_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import ultraedit.models
    from ultraedit.cli import main

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(ultraedit.models, "load_model", no_work)
    for out, needle in ((tmp_path / "no" / "p.json", "does not exist"),
                        (tmp_path, "ends in .json"),
                        (tmp_path / "p.txt", "ends in .json")):
        assert main(["tune", "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ultraedit tune: error: --out"), err
        assert needle in err[0]
    assert main(["tune", "--out", str(tmp_path / "p.json"), "--budget-minutes", "0"]) == 2
    assert "--budget-minutes" in capsys.readouterr().err


def test_grid_options_replace_the_searched_values(tmp_path, capsys, monkeypatch):
    """``--grid FIELD=V1,V2`` reaches the search as typed values; bad ones fail before loading."""
    import ultraedit.models
    from ultraedit.cli import main
    from ultraedit.cli.tune import parse_grid

    assert parse_grid(["positions=subject", "windows=2-6,24-28", "lr=5e-5,1e-4",
                       "hold_done=true", "steps=1,12"]) == {
        "positions": ["subject"], "windows": [[2, 6], [24, 28]], "lr": [5e-5, 1e-4],
        "hold_done": [True], "steps": [1, 12]}

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before --grid was checked")

    monkeypatch.setattr(ultraedit.models, "load_model", no_work)
    for bad in ("positions", "colour=red", "windows=6-2", "lr=fast", "hold_done=maybe",
                "lr=-1", "lr=nan", "steps=0", "positions=middle", "memory=-1"):
        assert main(["tune", "--out", str(tmp_path / "p.json"), "--grid", bad]) == 2
        assert "--grid" in capsys.readouterr().err


def test_schedule_halves_and_keeps_two_finalists():
    from ultraedit.tune import plan_schedule, round_sizes

    assert round_sizes(50, 3, 3) == [6, 17, 50]
    assert [s["candidates"] for s in plan_schedule(15, 50, 3, 3)] == [15, 5, 2]
    assert [s["candidates"] for s in plan_schedule(9, 50, 3, 3)] == [9, 3, 2]
    assert [s["candidates"] for s in plan_schedule(1, 4, 2, 3)] == [1, 1, 1]


def test_the_check_on_a_longer_stream_picks_from_its_own_round(tiny, facts, monkeypatch):
    from ultraedit.editor import UltraEditor
    from ultraedit.tune import choose, survivors, tune

    model, tok = tiny
    turns_edited = []
    real_edit = UltraEditor.edit

    def edit(self, requests, *args, **kwargs):
        turns_edited.append([r["prompt"] for r in requests])
        return real_edit(self, requests, *args, **kwargs)

    monkeypatch.setattr(UltraEditor, "edit", edit)
    lines = []
    result = tune(model, tok, budget_s=120, seed=3, ls_target=0.5, turns=1, edits_per_turn=4,
                  eta=2, rounds=2, candidates=6, records=facts, grid=GRID, check_turns=2,
                  check_candidates=2, log=lines.append)
    t = result.preset["tuning"]
    assert t["check_turns"] == 2 and t["check_candidates"] == 2
    assert t["schedule"][-1] == {"candidates": 2, "edits_per_turn": 4, "turns": 2}
    rows = [[r for r in t["candidates"] if r["round"] == k] for k in (0, 1, 2)]
    assert [len(r) for r in rows] == [6, 3, 2]
    assert [r["candidate"] for r in rows[2]] == [r["candidate"] for r in survivors(rows[1], 2, 0.5)]
    assert {r["turns"] for r in rows[2]} == {2} and {r["edits"] for r in rows[2]} == {8}
    assert 0 in {r["candidate"] for r in rows[2]}
    # the check's stream: the schedule's last facts first, then the next ones
    prompts = [r.prompt for r in facts]
    assert turns_edited[-2:] == [prompts[:4], prompts[4:8]]
    assert result.chosen == choose(rows[2], 0.5) and t["chosen_round"] == 2
    assert "(2 lifelong turns)" in result.preset["description"]
    assert any(line.startswith("check: 2 candidates") for line in lines)
    assert any(line.startswith("[check 1/2]") for line in lines)


def test_the_check_needs_its_facts_and_sane_values(tiny, facts, tmp_path, capsys):
    from ultraedit.cli import main
    from ultraedit.tune import tune

    model, tok = tiny
    with pytest.raises(ValueError, match=r"8 records; 3 turns x 4 edits need 12"):
        tune(model, tok, budget_s=5, turns=1, edits_per_turn=4, records=facts, grid=GRID,
             check_turns=3)
    with pytest.raises(ValueError, match="check_turns must be >= 0"):
        tune(model, tok, budget_s=5, turns=1, edits_per_turn=4, records=facts, grid=GRID,
             check_turns=-1)
    assert main(["tune", "--out", str(tmp_path / "p.json"), "--check-turns", "-1"]) == 2
    assert "--check-turns" in capsys.readouterr().err


def test_more_candidates_than_the_grid_holds_scores_the_grid(tiny, facts):
    """``candidates`` beyond the search space (or a round 0 sized larger than it) scores what
    there is instead of failing."""
    from ultraedit.tune import tune

    model, tok = tiny
    lines = []
    result = tune(model, tok, budget_s=60, turns=1, edits_per_turn=2, rounds=1, candidates=50,
                  records=facts, grid={**GRID, "steps": [1], "lr": [1e-3]}, log=lines.append)
    assert any("scoring those" in line for line in lines)
    assert len(result.rows) == len({r["candidate"] for r in result.rows}) <= 50


def test_a_family_or_window_the_model_cannot_edit_fails_before_the_facts(tiny, facts):
    from ultraedit.tune import tune

    model, tok = tiny
    with pytest.raises(ValueError, match="can only edit nn.Linear"):
        tune(model, tok, budget_s=60, records=facts, grid=GRID,
             families=["model.layers.{i}.input_layernorm"])
    with pytest.raises(ValueError, match="not within the model's layers"):
        tune(model, tok, budget_s=60, records=facts, grid={**GRID, "windows": [[50, 60]]})


def test_a_candidate_that_raises_anything_fails_alone(tiny, facts, monkeypatch):
    import ultraedit.tune as T

    model, tok = tiny
    real = T._score

    def flaky(model, tokenizer, records, ref, config, *a, **k):
        if config.lr == 1e-3:
            raise IndexError("index out of range in self")
        return real(model, tokenizer, records, ref, config, *a, **k)

    monkeypatch.setattr(T, "_score", flaky)
    result = T.tune(model, tok, budget_s=60, turns=1, edits_per_turn=2, rounds=1, candidates=4,
                    records=facts, grid={**GRID, "lr": [1e-3, 1e-2]})
    failed = [r for r in result.rows if r.get("error")]
    assert failed and all(r["error"].startswith("IndexError") for r in failed)


def test_budget_and_interrupt_edge_cases_are_one_line(tmp_path, capsys, monkeypatch):
    import ultraedit.models
    from ultraedit.cli import main

    monkeypatch.setattr(ultraedit.models, "load_model",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    for budget in ("nan", "inf", "0"):
        assert main(["tune", "--out", str(tmp_path / "p.json"), "--budget-minutes", budget]) == 2
        assert "--budget-minutes must be a positive number" in capsys.readouterr().err

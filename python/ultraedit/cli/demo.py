"""``ultraedit demo``: lifelong counterfactual edits on the embedded (or a local) model.

Loads the model, builds counterfactual edits from real country facts that the unedited model
answers correctly (``ultraedit.eval.demo_records``), applies them in lifelong turns and prints
Efficacy / Generalization / Locality before and after (``ultraedit.eval``), teacher-forced and
WILD-style (a question, greedy decoding to a stop string; ``--no-wild`` skips it), the unedited
model's scores on the facts' TRUE answers (how often it states what it knows through a
paraphrase or a question; ``--no-true-facts`` skips it), and the time per turn split into the
model's forward+backward and the editor's own overhead. Locality prompts that are
themselves edited in the run are dropped from every record: their answers are supposed to change.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict

from ._common import (EDIT_WORDINGS, UsageError, add_machine_options, check_output_paths,
                      check_threads, doc_description, error, fmt, load_cli_model, machine,
                      note_loadavg, peak_rss_bytes, prepare_machine, split_csv, write_json)
from .options import add_method_options, build_editor, check_method_options, input_files, \
    resolve, resolved_config

DEMO_RELATIONS = ("capital", "language")   # = ultraedit.eval.DEMO_RELATIONS, without importing it


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="counterfactual edits on the embedded model, with "
                                    "before/after ES/GS/LS and timings",
                       description=doc_description(__doc__))
    p.add_argument("--turns", type=int, default=2, help="number of lifelong turns (2)")
    p.add_argument("--edits-per-turn", type=int, default=50, help="edits per turn (50)")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="a local Hugging Face model directory, a .gguf file or 'gemma3-270m' "
                        "(default: embedded SmolLM2)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    p.add_argument("--seed", type=int, default=0, help="fact selection seed (0)")
    p.add_argument("--relations", default=None,
                   help=f"comma-separated offline relations ({','.join(DEMO_RELATIONS)})")
    p.add_argument("--wild", action=argparse.BooleanOptionalAction, default=True,
                   help="WILD-style scores (a question, greedy decoding to '.', a newline or "
                        "EOS, at most 50 tokens; normalized match) after editing")
    p.add_argument("--true-facts", action=argparse.BooleanOptionalAction, default=True,
                   help="before editing, score the unedited model against the facts' TRUE "
                        "answers (ES/GS; WILD-style too with --wild): the yardstick for GS")
    p.add_argument("--edit-wordings", choices=EDIT_WORDINGS, default="prompt",
                   help="edit through each fact's cloze prompt (prompt, the default), through "
                        "the same prompt asked as a question as the WILD-style scores ask it "
                        "(question), or both")
    add_method_options(p)
    add_machine_options(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        return _demo(args)
    except UsageError as err:   # Ctrl-C: the command line's handler says so (exit 130)
        return error("demo", str(err))


def _demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.turns < 1 or args.edits_per_turn < 1:
        raise UsageError("--turns and --edits-per-turn must be at least 1")
    check_threads(args.threads)
    check_output_paths([("--json", args.json)],
                       inputs=[("--model", args.model if args.model and os.path.isdir(args.model)
                                else None), *input_files(args)])
    check_method_options(args)
    relations = split_csv(args.relations) or list(DEMO_RELATIONS)
    from ..data import OFFLINE_RELATIONS, REPORT_RELATIONS, TUNING_RELATIONS

    bad = [r for r in relations if r not in OFFLINE_RELATIONS]
    if bad:
        raise UsageError(f"unknown offline relation(s) {bad}; choose from {OFFLINE_RELATIONS}")

    import torch

    from ..eval import demo_records, lifelong_run

    threads = prepare_machine(args.threads)
    host = machine()     # the load average before the work; loadavg_end after it
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tok = load_cli_model(args.model or "default")
    load_s = time.perf_counter() - t0
    config = resolve(args, model)
    n = args.turns * args.edits_per_turn
    t1 = time.perf_counter()
    try:
        records = demo_records(model, tok, n, relations=relations, seed=args.seed)
    except ValueError as err:
        raise UsageError(str(err)) from None
    facts_s = time.perf_counter() - t1
    print(f"model: {args.model or 'default (SmolLM2-135M-Instruct)'}  loaded in {load_s:.1f}s; "
          f"{n} counterfactual edits of {relations} known to the model ({facts_s:.1f}s)",
          file=sys.stderr)
    editor = build_editor(model, tok, config, progress=not args.no_progress)
    try:
        run = lifelong_run(model, tok, records, editor, args.turns, args.edits_per_turn,
                           eval_before=True, eval_end=True, progress=not args.no_progress,
                           wild=args.wild, true_facts=args.true_facts,
                           wordings=args.edit_wordings)
    except ValueError as err:   # a request the editor refuses: its own message
        raise UsageError(str(err)) from None
    result = demo_result(run, editor)
    split = ("report" if set(relations) <= set(REPORT_RELATIONS) else
             "tuning" if set(relations) <= set(TUNING_RELATIONS) else "all")
    result.update({"model": args.model or "default", "preset": args.preset, "seed": args.seed,
                   "split": split, "edit_wordings": args.edit_wordings,
                   "relations": relations, "threads": threads, "machine": host})
    note_loadavg(host, "loadavg_end")
    result["timing"].update({"load_s": load_s, "facts_s": facts_s})
    result["memory"]["process_peak_rss_bytes"] = peak_rss_bytes()
    print_demo(result, args.turns, args.edits_per_turn)
    if args.json:
        write_json(result, args.json, indent=2)
        print(f"wrote {args.json}")
    return 0


def _scores(tf: Dict[str, Any]) -> Dict[str, Any]:
    return {k: tf.get(k) for k in ("es", "gs", "ls", "gs_known") if k in tf}


def _wild(sc: Dict[str, Any]) -> Dict[str, Any]:
    keys = ("es", "gs", "ls", "pt", "es_contains", "gs_contains", "ls_contains", "pt_contains",
            "examples")
    return {k: sc.get(k) for k in keys}


def demo_result(run: Dict[str, Any], editor) -> Dict[str, Any]:
    """The demo's JSON from a :func:`ultraedit.eval.lifelong_run` result."""
    rows = run["turns"]
    fwd = [r["fwd_bwd_s"] for r in rows]
    ed = [r["editor_s"] for r in rows]
    t = run["timing"]
    return {
        "edits": run["edits"],
        "settings": {"turns": len(rows), "edits_per_turn": max(r["edits"] for r in rows)},
        "edit_config": resolved_config(editor),
        "metrics": {"before": _scores(run["before"]["teacher_forced"]),
                    "after": _scores(run["final"]["teacher_forced"])},
        "wild": ({"after": _wild(run["final"]["wild"])} if run["final"].get("wild") else None),
        "true_facts": run.get("true_facts"),
        "timing": {"turn_s": [r["turn_s"] for r in rows], "fwd_bwd_s": fwd, "editor_s": ed,
                   "editor_overhead": sum(ed) / sum(fwd) if sum(fwd) > 0 else None,
                   "eval_before_s": t["locality_reference_s"] + t["eval_before_s"],
                   "eval_after_s": t["eval_end_s"], "preserve_s": editor.preserve_s,
                   "preserve_cached": editor.preserve_cached,
                   "wild_s": sum(t.get(k, 0.0) for k in ("wild_reference_s", "wild_end_s")),
                   "wild_reference_s": t.get("wild_reference_s"),
                   "wild_end_s": t.get("wild_end_s"), "true_facts_s": t.get("true_facts_s")},
        "memory": run["memory"],
        "turns": rows,
    }


def _count(n: int, noun: str) -> str:
    """``"1 step"``, ``"12 steps"``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def settings_line(s: Dict[str, Any]) -> str:
    """The demo's one-line summary of a run's recorded ``edit_config``."""
    modules = s["modules"]
    shown = modules[0] + (" ..." if len(modules) > 1 else "")
    return (f"lr={s['lr']:g}, {_count(s['steps'], 'step')}"
            + (f" held to a logit margin of {s['hold_margin']:g}" if s.get("hold_margin") else "")
            + (f", held ones re-checked every {s['recheck']}" if s.get("recheck", 0) > 1 else "")
            + f", {s['positions']} positions, memory={s['memory']:g}, preserve={s['preserve']:g}"
            + (f", whiten={s['whiten']:g}" if s.get("whiten") else "")
            + f", {_count(len(modules), 'module')} ({shown})")


def print_demo(result: Dict[str, Any], turns: int, edits_per_turn: int) -> None:
    b, a = result["metrics"]["before"], result["metrics"]["after"]
    s = result["edit_config"]
    print(f"\n{result['edits']} edits in {turns} turns of {edits_per_turn}; {settings_line(s)}")
    if s["preserve"] > 0:
        how = ("read from the cache" if result["timing"].get("preserve_cached") else
               "captured once")
        print(f"preserved subjects' keys {how}, before the first turn, in "
              f"{result['timing']['preserve_s']:.1f}s")
    split = result.get("split", "all")
    what = {"report": "report relations", "tuning": "tuning relations",
            "all": "tuning and report relations"}[split]
    print(f"facts: offline relations {', '.join(result.get('relations') or [])} "
          f"(split {split}: {what})")
    print("                              ES     GS     LS")
    print(f"before   teacher-forced    {fmt(b['es'])}  {fmt(b['gs'])}  {fmt(b['ls'])}")
    print(f"after    teacher-forced    {fmt(a['es'])}  {fmt(a['gs'])}  {fmt(a['ls'])}")
    true = result.get("true_facts")
    if true and true.get("n"):
        print("TRUE answers, unedited:")
        print(f"         teacher-forced    {fmt(true['es'])}  {fmt(true['gs'])}")
        if true.get("wild_es") is not None:
            print(f"         WILD-style exact  {fmt(true['wild_es'])}  {fmt(true['wild_gs'])}")
            print(f"           ... contains    {fmt(true['wild_es_contains'])}  "
                  f"{fmt(true['wild_gs_contains'])}")
        if a.get("gs_known") is not None:
            print(f"after    GS over the {true['known_paraphrases']} paraphrases completed "
                  f"with the true answer before editing: {fmt(a['gs_known'])}")
    wild = result.get("wild")
    if wild:
        w = wild["after"]
        print(f"after    WILD-style exact  {fmt(w['es'])}  {fmt(w['gs'])}  {fmt(w['ls'])}")
        print(f"after      ... contains    {fmt(w['es_contains'])}  {fmt(w['gs_contains'])}  "
              f"{fmt(w.get('ls_contains'))}")
        print(f"WILD-style evaluation (a question, greedy decoding to a stop string): "
              f"{result['timing']['wild_s']:.1f}s in all")
    print("turn  forward+backward  editor overhead   total")
    t = result["timing"]
    for i, (f, e, tt) in enumerate(zip(t["fwd_bwd_s"], t["editor_s"], t["turn_s"]), 1):
        print(f"{i:4d}  {f:15.3f}s  {e:13.3f}s ({100 * e / f:4.1f}%)  {tt:6.3f}s")
    mem = result["memory"]
    what = ("CUDA allocator peak" if mem["peak_source"] == "cuda" else
            "estimate: weights, saved activations, captured rows, solver workspace")
    rss = mem.get("process_peak_rss_bytes")
    print(f"peak memory of a turn: {mem['peak_bytes'] / 2**20:.0f} MiB ({what}); editor's "
          f"captured rows and factors: {mem['capture_bytes'] / 2**20:.2f} MiB"
          + (f"; whole process (peak RSS): {rss / 2**20:.0f} MiB" if rss else ""))

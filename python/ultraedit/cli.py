"""The ``ultraedit`` command line: ``ultraedit demo`` (and further subcommands, one function each).

``ultraedit demo`` loads the default model (the embedded SmolLM2-135M-Instruct, or ``--model
DIR``), builds counterfactual edits from real country facts that the unedited model answers
correctly (``ultraedit.data.offline_facts`` + ``filter_known``), applies them in lifelong turns
and prints Efficacy / Generalization / Locality before and after (``ultraedit.metrics``) and
the time per turn split into the model's forward+backward and the editor's own overhead.

Locality prompts that are themselves edited in the run (another record's rewrite prompt or
paraphrase) are dropped from every record: their answers are supposed to change.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from .data.records import drop_edited_locality

__all__ = ["main", "build_parser", "cmd_demo", "demo_records", "run_demo"]

DEMO_RELATIONS = ("capital", "language")


def _split_csv(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    return items or None


# ------------------------------------------------------------------------------ demo pieces
def demo_records(model, tokenizer, n: int, relations: Sequence[str] = DEMO_RELATIONS,
                 seed: int = 0, n_locality: int = 3, skip: int = 0, chunk: Optional[int] = None,
                 exclude_subjects: Sequence[str] = ()) -> List[Any]:
    """``n`` counterfactual records whose true answer the unedited model predicts.

    Candidates of each relation are shuffled with ``seed`` and interleaved round-robin; the
    first ``skip`` known records are passed over (so disjoint slices can be drawn), and
    subjects in ``exclude_subjects`` are never used. Raises ValueError when fewer than ``n``
    known facts exist.
    """
    from .data.offline import filter_known, offline_facts

    excluded = set(exclude_subjects)
    streams = []
    for rel in relations:
        recs = [r for r in offline_facts((rel,), seed=seed, n_locality=n_locality)
                if r.subject not in excluded]
        random.Random(f"demo:{seed}:{rel}").shuffle(recs)
        streams.append(recs)
    candidates = []
    for i in range(max((len(s) for s in streams), default=0)):
        candidates += [s[i] for s in streams if i < len(s)]
    known: List[Any] = []
    need = n + skip
    # about a third of the candidates are known: check a few times what is still needed at once
    chunk = chunk or max(32, 2 * need)
    for start in range(0, len(candidates), chunk):
        known += filter_known(candidates[start:start + chunk], model, tokenizer)
        if len(known) >= need:
            break
    if len(known) < need:
        raise ValueError(f"only {len(known)} facts of {list(relations)} are known to the model; "
                         f"{need} needed (lower --turns/--edits-per-turn or add relations)")
    return drop_edited_locality(known[skip:need])


def _scores(result: Dict[str, Any]) -> Dict[str, float]:
    return {k: (None if result.get(k) is None else float(result[k])) for k in ("es", "gs", "ls")}


def run_demo(model, tokenizer, records: Sequence[Any], turns: int, edits_per_turn: int,
             editor_kwargs: Optional[Dict[str, Any]] = None, progress: bool = True,
             evaluate_before: bool = True) -> Dict[str, Any]:
    """Edit ``records`` in ``turns`` turns of ``edits_per_turn`` and measure before/after."""
    from tqdm.auto import tqdm

    from .editor import UltraEditor
    from .metrics import evaluate_records, locality_reference

    t0 = time.perf_counter()
    ref = locality_reference(model, tokenizer, records)
    before = (_scores(evaluate_records(model, tokenizer, records, locality_reference=ref))
              if evaluate_before else None)
    eval_before_s = time.perf_counter() - t0
    editor = UltraEditor(model, tokenizer, **(editor_kwargs or {}))
    reports = []
    bar = tqdm(range(turns), desc="edit turns", unit="turn", disable=not progress,
               file=sys.stderr)
    for turn in bar:
        chunk = records[turn * edits_per_turn:(turn + 1) * edits_per_turn]
        rep = editor.edit([r.as_request() for r in chunk])
        reports.append(rep)
        bar.set_postfix(fwd_bwd=f"{rep.fwd_bwd_s:.2f}s", editor=f"{rep.editor_s:.3f}s")
    bar.close()
    t1 = time.perf_counter()
    after = _scores(evaluate_records(model, tokenizer, records, locality_reference=ref))
    eval_after_s = time.perf_counter() - t1
    fwd = [r.fwd_bwd_s for r in reports]
    ed = [r.editor_s for r in reports]
    return {
        "edits": len(records),
        "settings": {"turns": turns, "edits_per_turn": edits_per_turn, "lr": editor.lr,
                     "ridge": editor.ridge, "micro_batch": editor.micro_batch,
                     "compat": editor.compat, "normalizer": editor.normalizer,
                     "steps": editor.steps, "protect_mean": editor.protect_mean,
                     "hold_done": editor.hold_done, "positions": editor.positions,
                     "memory": editor.memory, "preserve": editor.preserve,
                     "modules": list(editor.modules)},
        "metrics": {"before": before, "after": after},
        "timing": {"turn_s": [r.turn_s for r in reports], "fwd_bwd_s": fwd, "editor_s": ed,
                   "editor_overhead": sum(ed) / sum(fwd) if sum(fwd) > 0 else None,
                   "eval_before_s": eval_before_s, "eval_after_s": eval_after_s,
                   "preserve_s": editor.preserve_s},
        "memory": {"peak_bytes": max(r.peak_bytes for r in reports),
                   "peak_source": reports[0].peak_source,
                   "capture_bytes": max(r.capture_bytes for r in reports)},
        "turns": [r.as_dict() for r in reports],
    }


def _default_threads() -> Optional[int]:
    """1 thread when the CPU is oversubscribed (load average above the core count): OpenMP
    threads that wait for each other are then many times slower than one thread. Otherwise
    None (torch's default)."""
    try:
        busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return None
    return 1 if busy else None


def _fmt(x: Optional[float]) -> str:
    return "  n/a" if x is None else f"{x:5.3f}"


def cmd_demo(args: argparse.Namespace) -> int:
    """``ultraedit demo``: lifelong counterfactual edits on the embedded (or a local) model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from .models import load_model
    from .run import method_kwargs

    if args.turns < 1 or args.edits_per_turn < 1:
        print("error: --turns and --edits-per-turn must be at least 1", file=sys.stderr)
        return 2
    threads = args.threads or _default_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tok = load_model(args.model or "default")
    load_s = time.perf_counter() - t0
    n = args.turns * args.edits_per_turn
    t1 = time.perf_counter()
    relations = _split_csv(args.relations) or list(DEMO_RELATIONS)
    records = demo_records(model, tok, n, relations=relations, seed=args.seed)
    facts_s = time.perf_counter() - t1
    kwargs: Dict[str, Any] = {"micro_batch": args.micro_batch, "compat": args.compat}
    if args.lr is not None:
        kwargs["lr"] = args.lr
    if args.modules:
        kwargs["modules"] = _split_csv(args.modules)
    kwargs.update(method_kwargs(args))
    print(f"model: {args.model or 'default (SmolLM2-135M-Instruct)'}  loaded in {load_s:.1f}s; "
          f"{n} counterfactual edits of {relations} known to the model ({facts_s:.1f}s)",
          file=sys.stderr)
    result = run_demo(model, tok, records, args.turns, args.edits_per_turn, kwargs,
                      progress=not args.no_progress)
    result["model"] = args.model or "default"
    result["seed"] = args.seed
    result["relations"] = relations
    result["timing"]["load_s"] = load_s
    result["timing"]["facts_s"] = facts_s
    result["threads"] = torch.get_num_threads()

    b, a = result["metrics"]["before"], result["metrics"]["after"]
    s = result["settings"]
    print(f"\n{n} edits in {args.turns} turns of {args.edits_per_turn}; lr={s['lr']:g}, "
          f"{s['steps']} steps, {s['positions']} positions, memory={s['memory']:g}, "
          f"preserve={s['preserve']:g}, {len(s['modules'])} modules ({s['modules'][0]} ...)")
    if s["preserve"] > 0:
        print(f"preserved subjects' keys captured once, before the first turn, in "
              f"{result['timing']['preserve_s']:.1f}s")
    print("            ES     GS     LS")
    print(f"before   {_fmt(b['es'])}  {_fmt(b['gs'])}  {_fmt(b['ls'])}")
    print(f"after    {_fmt(a['es'])}  {_fmt(a['gs'])}  {_fmt(a['ls'])}")
    print("turn  forward+backward  editor overhead   total")
    for i, (f, e, t) in enumerate(zip(result["timing"]["fwd_bwd_s"], result["timing"]["editor_s"],
                                      result["timing"]["turn_s"]), 1):
        print(f"{i:4d}  {f:15.3f}s  {e:13.3f}s ({100 * e / f:4.1f}%)  {t:6.3f}s")
    mem = result["memory"]
    print(f"peak memory: {mem['peak_bytes'] / 2**20:.0f} MiB ({mem['peak_source']}); "
          f"editor's captured rows and factors: {mem['capture_bytes'] / 2**20:.2f} MiB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ultraedit", description="Lifelong knowledge editing with UltraEdit.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from . import run as _run  # ``ultraedit run`` lives in ultraedit/run.py

    demo = sub.add_parser("demo", help="counterfactual edits on the embedded model, with "
                                       "before/after ES/GS/LS and timings",
                          description=cmd_demo.__doc__)
    demo.add_argument("--turns", type=int, default=2, help="number of lifelong turns (2)")
    demo.add_argument("--edits-per-turn", type=int, default=50, help="edits per turn (50)")
    demo.add_argument("--model", metavar="DIR", default=None,
                      help="a local Hugging Face model directory (default: embedded SmolLM2)")
    demo.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    demo.add_argument("--seed", type=int, default=0, help="fact selection seed (0)")
    demo.add_argument("--lr", type=float, default=None,
                      help="pseudo-value lr (default: measured for the embedded model, "
                           "the paper's 1e-6 otherwise)")
    demo.add_argument("--modules", default=None,
                      help="comma-separated module names or glob/re: patterns")
    _run.add_method_options(demo)
    demo.add_argument("--relations", default=None,
                      help=f"comma-separated offline relations ({','.join(DEMO_RELATIONS)})")
    demo.add_argument("--micro-batch", type=int, default=10, help="requests per forward (10)")
    demo.add_argument("--compat", choices=("fixed", "official"), default="fixed")
    demo.add_argument("--threads", type=int, default=None,
                      help="torch CPU threads (default: torch's, or 1 on a busy CPU)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="a lifelong editing run over a data set (or the offline "
                                     "facts) with per-turn and final metrics, JSON and plot",
                         description=_run.main.__doc__)
    _run.add_arguments(run)
    run.set_defaults(func=_run.main)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``ultraedit tune``: search an editing preset for a model within a time budget, on the tuning
relations only, and write it as a preset file (:mod:`ultraedit.tune`).

    ultraedit tune --model DIR --out presets/my-model.json            # 45 minutes
    ultraedit run --model DIR --data offline --split report --preset presets/my-model.json
    ULTRAEDIT_PRESETS=presets ultraedit run --model DIR ...        # found by fingerprint

Successive halving: many candidates (module family over early/middle/late layer windows,
capture positions, lr, steps, held edits, key memory, preserved subjects, mean-key protection)
on few edits, the best third on three times more, and so on to the full protocol (2 lifelong
turns of 50 by default), then, with --check-turns K, the best few on a longer stream of K turns.
The rule is fixed before the search and recorded: the highest
teacher-forced ES with LS >= --ls-target, ties to the cheaper turn. With --edit-wordings
question every candidate edits, and is scored, through the facts asked as questions. The output
path is checked before any work; the file is written atomically once the search ends (or the
budget runs out, or Ctrl-C: then with the best so far).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from ._common import EDIT_WORDINGS, EXIT_INTERRUPTED, UsageError, add_machine_options, \
    check_output_paths, check_threads, doc_description, error, load_cli_model, prepare_machine, \
    split_csv

DEFAULT_LS_TARGET = 0.85   # = ultraedit.tune.DEFAULT_LS_TARGET (--help without torch)


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="search an editing preset for a model in a time budget (tuning "
                                    "relations only) and write it as a preset file",
                       description=doc_description(__doc__))
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct) or a local HF model directory")
    p.add_argument("--out", metavar="FILE.json", required=True,
                   help="the preset file to write (checked before any work; loaded by --preset "
                        "FILE, and by EditConfig.for_model from a folder in ULTRAEDIT_PRESETS)")
    p.add_argument("--name", default=None,
                   help="the preset's name (default: the file name without .json)")
    p.add_argument("--budget-minutes", type=float, default=45.0,
                   help="wall-clock budget of the search in minutes (45); the schedule is sized "
                        "for it and the search stops with the best so far when it runs out")
    p.add_argument("--ls-target", type=float, default=DEFAULT_LS_TARGET,
                   help=f"the rule: the highest ES among candidates with LS >= this "
                        f"({DEFAULT_LS_TARGET})")
    p.add_argument("--turns", type=int, default=2,
                   help="lifelong turns per candidate (2)")
    p.add_argument("--edits-per-turn", type=int, default=50,
                   help="edits per turn of the last round (50); earlier rounds use 1/eta of the "
                        "next round's")
    p.add_argument("--eta", type=int, default=3,
                   help="successive halving: each round keeps 1/eta of the candidates on eta "
                        "times more edits (3)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the schedule (3)")
    p.add_argument("--candidates", type=int, default=None,
                   help="candidates of round 0 (default: as many as the budget allows, sized "
                        "after timing the first)")
    p.add_argument("--families", default=None, metavar="A,B,...",
                   help="module families searched, comma-separated: suffixes under the layer "
                        "list ('mlp.up_proj') or templates with {i} (default: the MLP output "
                        "projection)")
    p.add_argument("--known", action=argparse.BooleanOptionalAction, default=True,
                   help="tune on the facts the unedited model answers correctly (default); "
                        "--no-known takes the first tuning facts (a model that knows none)")
    p.add_argument("--seed", type=int, default=0,
                   help="fact selection, candidate order and torch seed (0)")
    p.add_argument("--check-turns", type=int, default=0, metavar="K",
                   help="after the schedule, its best candidates, the current config and a "
                        "trade-off (4) edit a longer lifelong stream of K turns of "
                        "--edits-per-turn and the pick comes from it; its time comes out of the "
                        "budget (0: no check; K x --edits-per-turn known tuning facts needed)")
    p.add_argument("--edit-wordings", choices=EDIT_WORDINGS, default="prompt",
                   help="the wording every candidate edits through and is scored in: 'prompt' "
                        "(the rewrite prompts, default), 'question' (the facts asked as the "
                        "WILD-style scores ask them, 'Q: <question>\\nA:'), 'both' (each score "
                        "the mean of the two); match it with `ultraedit run --edit-wordings`")
    p.add_argument("--grid", action="append", default=None, metavar="FIELD=V1,V2,...",
                   help="replace the searched values of one field (repeatable): positions "
                        "(subject, answer), windows (first-last layers, e.g. 2-6), lr, steps, "
                        "hold_done, hold_margin, memory, preserve, protect_mean, whiten; e.g. "
                        "--grid positions=subject --grid lr=5e-5,1e-4")
    add_machine_options(p)
    p.set_defaults(func=main)


_GRID_TYPES = {"positions": str, "lr": float, "steps": int, "hold_margin": float,
               "memory": float, "preserve": float, "protect_mean": float, "whiten": float}


def parse_grid(items) -> dict:
    """``--grid FIELD=V1,V2`` options as ``tune``'s ``grid`` (a :class:`UsageError` naming a bad
    one)."""
    grid = {}
    for item in items or ():
        field, sep, text = item.partition("=")
        field = field.strip()
        values = split_csv(text)
        if not sep or not values:
            raise UsageError(f"--grid {item!r}: expected FIELD=V1,V2,...")
        try:
            if field == "windows":
                parsed = [[int(x) for x in v.split("-", 1)] for v in values]
                if any(len(w) != 2 or w[0] > w[1] for w in parsed):
                    raise ValueError("a window is FIRST-LAST")
            elif field == "hold_done":
                parsed = [{"true": True, "false": False}[v.lower()] for v in values]
            elif field in _GRID_TYPES:
                parsed = [_GRID_TYPES[field](v) for v in values]
            else:
                raise UsageError(f"--grid: unknown field {field!r}; give one of "
                                 f"{['windows', 'hold_done', *_GRID_TYPES]}")
        except KeyError as err:
            raise UsageError(f"--grid {item!r}: {err} is not true or false") from None
        except ValueError as err:
            raise UsageError(f"--grid {item!r}: {err}") from None
        if field != "windows":   # each value as the editor would take it, before loading
            from .options import check_field

            for value in parsed:
                try:
                    check_field(field, value)
                except (ValueError, TypeError) as err:
                    raise UsageError(f"--grid {item!r}: {err}") from None
        if field in grid:
            raise UsageError(f"--grid {field} given twice")
        grid[field] = parsed
    return grid


def main(args: argparse.Namespace) -> int:
    try:
        return _tune(args)
    except UsageError as err:
        return error("tune", str(err))


def _tune(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_threads(args.threads)
    if not (math.isfinite(args.budget_minutes) and args.budget_minutes > 0):
        raise UsageError(f"--budget-minutes must be a positive number of minutes, got "
                         f"{args.budget_minutes}")
    if not 0 <= args.ls_target <= 1:
        raise UsageError(f"--ls-target must be in 0..1, got {args.ls_target}")
    if args.turns < 1 or args.edits_per_turn < 1 or args.rounds < 1 or args.eta < 2:
        raise UsageError("--turns, --edits-per-turn and --rounds must be at least 1, --eta at "
                         "least 2")
    if args.candidates is not None and args.candidates < 1:
        raise UsageError(f"--candidates must be at least 1, got {args.candidates}")
    if args.check_turns < 0:
        raise UsageError(f"--check-turns must be 0 (no check) or more, got {args.check_turns}")
    grid = parse_grid(args.grid)
    if not args.out.endswith(".json"):
        raise UsageError(f"--out {args.out!r}: a preset file name ends in .json")
    check_output_paths([("--out", args.out)],
                       inputs=[("--model", args.model if os.path.isdir(args.model) else None)])

    import torch

    from ..tune import TuneInterrupted, default_log, tune, write_preset

    prepare_machine(args.threads)
    torch.manual_seed(args.seed)
    model, tok = load_cli_model(args.model)
    name = args.name or os.path.splitext(os.path.basename(args.out))[0]
    log = default_log if not args.no_progress else (lambda s: None)
    try:
        result = tune(model, tok, budget_s=60.0 * args.budget_minutes, seed=args.seed,
                      ls_target=args.ls_target, turns=args.turns,
                      edits_per_turn=args.edits_per_turn, eta=args.eta, rounds=args.rounds,
                      candidates=args.candidates, families=split_csv(args.families),
                      known=args.known, name=name, log=log, model_name=args.model,
                      wordings=args.edit_wordings, check_turns=args.check_turns,
                      grid=grid or None)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    except RuntimeError as err:   # nothing scored, or every candidate of the last round failed
        print(f"ultraedit tune: {err}; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(err, TuneInterrupted) else 1
    result.preset["tuning"]["command"] = " ".join(["ultraedit"] + sys.argv[1:])
    write_preset(result.preset, args.out)
    c = result.chosen
    print(f"chosen: {c['label']} | ES {c['es']:.3f} GS {c['gs'] or 0:.3f} LS {c['ls']:.3f} on "
          f"{c['edits']} tuning edits; {len(result.rows)} candidates scored in "
          f"{result.preset['tuning']['wall_s'] / 60:.1f} min ({result.stopped})")
    if result.weak_note:
        print(f"{result.weak_note}. The ES/LS trade-offs of every round are in the file "
              f"(tuning.trade_offs): rerun with a lower --ls-target to choose among them")
    print(f"wrote {args.out}")
    return EXIT_INTERRUPTED if result.stopped == "interrupted" else 0

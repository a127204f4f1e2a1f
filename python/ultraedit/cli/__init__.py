"""The ``ultraedit`` command line, one module per subcommand:

- ``ultraedit demo`` (:mod:`ultraedit.cli.demo`): counterfactual edits on the embedded model with
  before/after scores and timings;
- ``ultraedit run`` (:mod:`ultraedit.cli.run`): a lifelong editing run over a data set or the
  offline facts, with per-turn and final scores, JSON and plot;
- ``ultraedit plan`` (:mod:`ultraedit.cli.plan`): a turn's peak memory predicted item by item
  from a model config, and whether it fits a budget (exit 1 when it does not);
- ``ultraedit tune`` (:mod:`ultraedit.cli.tune`): a budgeted search for a model's editing preset
  on the tuning relations, written as a preset file.

Exit status: 0 done, 2 a bad argument, path or input (one line on stderr, nothing done), 130
interrupted (Ctrl-C or SIGTERM). Importing this package and ``--help`` load neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import demo, plan, run, tune
from ._common import EXIT_INTERRUPTED, terminate_as_interrupt

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ultraedit", description="Lifelong knowledge editing with UltraEdit.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo.add_parser(sub)
    run.add_parser(sub)
    plan.add_parser(sub)
    tune.add_parser(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the commands print it: one line, without the source line it came from."""
    return f"warning: {message}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        with terminate_as_interrupt():     # SIGTERM stops a command as Ctrl-C does
            if hasattr(args, "no_progress"):
                # --no-progress also silences transformers' own bars (its weight loading bar)
                from transformers.utils import logging as hf_logging

                (hf_logging.disable_progress_bar if args.no_progress
                 else hf_logging.enable_progress_bar)()
            return int(args.func(args) or 0)
    except KeyboardInterrupt:    # before a command's own handler (e.g. importing transformers)
        print(f"ultraedit {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:      # `ultraedit plan ... | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0
    finally:
        warnings.formatwarning = previous


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

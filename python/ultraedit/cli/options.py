"""The editing-method options of ``ultraedit demo`` and ``ultraedit run``, and the editor they
build."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict

from ._common import UsageError, split_csv

METHOD_OPTIONS = ("steps", "positions", "memory", "hold_done", "preserve")


def add_method_options(p: argparse.ArgumentParser) -> None:
    """The editor's settings; unset = the editor's default (the paper's with
    ``--compat official``)."""
    g = p.add_argument_group("editing method (unset: the editor's default for the model)")
    g.add_argument("--modules", default=None,
                   help="comma-separated module names / globs / re: patterns, or 'paper' for the "
                        "paper's choice for the architecture")
    g.add_argument("--lr", type=float, default=None,
                   help="pseudo-value lr (default: measured for the embedded model, 1e-6 else)")
    g.add_argument("--ridge", type=float, default=1.0, help="ridge lambda (1)")
    g.add_argument("--normalizer", choices=("shape", "module"), default="shape",
                   help="one running normalizer per weight shape (the paper) or per module")
    g.add_argument("--compat", choices=("fixed", "official"), default="fixed",
                   help="official: the reference code's numerics and the paper's settings")
    g.add_argument("--micro-batch", type=int, default=10, help="requests per forward (10)")
    g.add_argument("--steps", type=int, default=None,
                   help="capture+solve+apply steps per turn (1 with --compat official)")
    g.add_argument("--positions", choices=("answer", "subject"), default=None,
                   help="capture at the answer positions (the paper) or at each record's subject "
                        "('answer' with --compat official)")
    g.add_argument("--memory", type=float, default=None,
                   help="weight of the key memory of earlier turns (0 with --compat official)")
    g.add_argument("--hold-done", action=argparse.BooleanOptionalAction, default=None,
                   help="give edits the model already predicts pseudo-value 0 in each step and "
                        "end the turn when all hold (off with --compat official)")
    g.add_argument("--preserve", type=float, default=None,
                   help="weight of the preserved subjects' keys (0 with --compat official)")


def editor_kwargs(args: argparse.Namespace, model) -> Dict[str, Any]:
    """The ``UltraEditor`` keyword arguments of the options :func:`add_method_options` set."""
    from ..modules import paper_module_names

    kwargs: Dict[str, Any] = {"micro_batch": args.micro_batch, "compat": args.compat,
                              "ridge": args.ridge, "normalizer": args.normalizer}
    if args.lr is not None:
        kwargs["lr"] = args.lr
    kwargs.update({opt: getattr(args, opt) for opt in METHOD_OPTIONS
                   if getattr(args, opt) is not None})
    if args.modules:
        try:
            kwargs["modules"] = (paper_module_names(model) if args.modules.strip() == "paper"
                                 else split_csv(args.modules))
        except ValueError as err:
            raise UsageError(str(err)) from None
    return kwargs


def _preserves(model, kwargs: Dict[str, Any]) -> bool:
    from ..editor import default_preserve

    preserve = kwargs.get("preserve")
    if preserve is None:
        preserve = 0.0 if kwargs.get("compat") == "official" else default_preserve(model)
    return preserve > 0


def build_editor(model, tokenizer, kwargs: Dict[str, Any], progress: bool = True):
    """``UltraEditor(model, tokenizer, **kwargs)``; says so first when it captures the preserved
    subjects' keys (once, seconds to minutes). A setting the editor refuses (a module that is not
    a Linear, a bad value) is a :class:`UsageError`."""
    from ..editor import UltraEditor

    announce = progress and _preserves(model, kwargs)
    if announce:
        print("capturing the preserved subjects' keys once, before the first turn ...",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        editor = UltraEditor(model, tokenizer, **kwargs)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    if announce:
        print(f"preserved subjects' keys captured in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr, flush=True)
    return editor


def editor_settings(editor) -> Dict[str, Any]:
    """The editor's resolved settings, as recorded in result files."""
    return {"lr": editor.lr, "ridge": editor.ridge, "micro_batch": editor.micro_batch,
            "compat": editor.compat, "normalizer": editor.normalizer, "steps": editor.steps,
            "protect_mean": editor.protect_mean, "hold_done": editor.hold_done,
            "positions": editor.positions, "memory": editor.memory,
            "preserve": editor.preserve, "modules": list(editor.modules)}

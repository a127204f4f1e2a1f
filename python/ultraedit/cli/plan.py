"""``ultraedit plan``: a turn's peak memory, item by item, and whether it fits a budget,
predicted from a model config before anything is loaded (:mod:`ultraedit.plan`).

Exit status: 0 the turn fits, 1 it does not (the reason names the largest items and the
settings that lower them), 2 a bad argument.
"""

from __future__ import annotations

from .. import plan as _plan


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict a turn's peak memory and whether it fits a budget",
                       description=_plan.DESCRIPTION)
    _plan.add_arguments(p)
    p.set_defaults(func=lambda args: _plan.run(args, "ultraedit plan"))

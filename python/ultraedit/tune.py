"""A budgeted search for a model's editing preset, on the tuning relations only.

    from ultraedit.tune import tune
    result = tune(model, tokenizer, budget_s=45 * 60, seed=0)     # ultraedit tune --model DIR
    result.preset         # {"name", "description", "fingerprint", "config", "tuning"}

What it searches (:func:`search_space`, derived from the model): the edited modules (a module
family, by default the MLP output projection, over four layer windows of about a sixth of the
depth each: two early, one middle, one late), the capture positions (``subject``, ``answer``),
``lr``, ``steps``, ``hold_done`` with its ``hold_margin``, ``memory``, ``preserve``,
``protect_mean`` and ``whiten``.
Candidates are drawn from that grid without repetition (``random.Random(seed)``); the model's current config
(:meth:`EditConfig.for_model`: its preset, else the paper's) is always candidate 0.

How (successive halving, :func:`plan_schedule`): round 0 scores many candidates on few edits
(``turns`` lifelong turns of a few edits each), every next round keeps the best ``1/eta`` of the
previous one (by the rule; at least two) and scores them on ``eta`` times more edits; the last
round uses the full protocol (by default 2 turns of 50, as the hand tuning in
experiments/tuning.md). Every candidate of a round edits the same facts, from the unedited
model (weights restored between candidates), and is scored teacher-forced (ES, GS, LS
against the unedited model's predictions, :func:`ultraedit.eval.evaluate_records`) over all
its edits after its last turn. With ``wordings="question"`` every candidate edits through the
facts asked as questions and is scored teacher-forced on them
(:func:`ultraedit.eval.scored_records`).

The check on a longer stream (``check_turns``, off by default): a search on 100 edits prefers
settings whose cost shows only over a longer stream (a key memory costs ES at first and keeps
locality later; large steps edit well at first and erode the model turn after turn). With
``check_turns=K`` a last round follows the schedule: :data:`CHECK_CANDIDATES` of its last
round (:func:`survivors`: the best by the rule, candidate 0, the trade-offs) each edit ``K``
lifelong turns of ``edits_per_turn`` facts (the first ones the schedule's last round edited,
then more tuning facts), and the pick comes from that round. Its time is set aside before
round 0 is sized.

The rule (:data:`DEFAULT_RULE`, fixed before the search and recorded in the preset): the highest
ES among the candidates with LS >= ``ls_target``; ties go to the cheaper turn (fewer
forward+backward passes run), then to the earlier candidate. If no candidate meets the target,
the current config (candidate 0) is kept unless candidates beat it on both ES and LS, and then
the one of those with the highest LS (then ES) is chosen; the record says which. Of the places
in the next round, half go to a round's best candidates by the rule, one to candidate 0 and the
rest to its ES/LS trade-offs (:func:`survivors`). The pick comes from the last round that scored
a candidate (the most edits). Beside it the preset records, and the log prints, each round's
ES/LS trade-offs (:func:`trade_offs`: the candidates no other beats on both), and says when the
pick edits barely more than the current config, or less (ES within :data:`WEAK_GAIN`, or below):
on a model where only near no-ops keep LS >= ``ls_target``, those trade-offs say what a lower
target buys.

The budget (``budget_s``): the first candidate (the current config) is timed, a cost model
(seconds per edit and step, seconds of evaluation per edit, preserved-key capture per layer
window) is fitted to it, and the number of round-0 candidates is the largest whose schedule is
predicted to fit in 85% of what is left after the check's predicted time (at least
``eta ** (rounds - 1)``, so that every round halves), re-sized (never down) after every round-0 candidate. Before each candidate the
prediction is checked against the time left; a candidate that would not finish is not started,
the search stops cleanly and the best so far is chosen. Times observed correct the predictions
as the search goes.

Facts: the offline stand-in facts of the TUNING relations only (``ultraedit.data``,
``split="tuning"``): the facts the unedited model answers correctly (``known=True``; looked for
during at most :data:`KNOWN_SHARE` of the budget, then a ValueError suggests ``known=False``),
else (``known=False``, for models that know few, e.g. a base model or tests) the first ones. A record of another
relation is an error; the report relations are never drawn. The preset file records the split
and the relations.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .config import EditConfig, model_fingerprint

__all__ = ["tune", "search_space", "plan_schedule", "rank_key", "pick", "choose", "beats", "trade_offs",
           "survivors",
           "TuneResult", "TuneInterrupted", "CHECK_CANDIDATES", "DEFAULT_RULE", "DEFAULT_LS_TARGET", "WEAK_GAIN",
           "weak_pick_note",
           "write_preset"]

DEFAULT_LS_TARGET = 0.85
DEFAULT_RULE = ("the highest teacher-forced ES among the candidates with LS >= {target}; ties: "
                "fewer forward+backward passes run, then the earlier candidate; if none meets "
                "the target: the current config (candidate 0), unless candidates beat it on "
                "both ES and LS, then the highest LS of those, then ES; the pick comes from the "
                "last round that scored a candidate")
# grids of the searched fields (values beyond the paper's first where they measured well)
LR_GRID = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4)
STEPS_GRID = (1, 6, 12)
MEMORY_GRID = (0.0, 1.0, 4.0)
PRESERVE_GRID = (0.0, 0.3, 1.0)
PROTECT_GRID = (0.0, 4.0)
WHITEN_GRID = (0.0, 1e-3)   # 1e-3 beat 1e-2 and 1e-4 over 1,000 edits (experiments/locality.md)
HOLD_MARGIN_GRID = (0.0, 1.0)   # with hold_done only (1: the embedded model's lifelong preset)
POSITIONS = ("subject", "answer")
# first layer of each window, as a fraction of the depth: two early, one middle, one late
WINDOW_STARTS = (0.07, 0.14, 0.4, 0.8)
SEARCHED = ("modules", "positions", "lr", "steps", "hold_done", "hold_margin", "memory",
            "preserve", "protect_mean", "whiten")
# what the rule and the preset's description add for a search in another wording than the prompt
WORDING_RULE = {"prompt": "",
                "question": "; edits and scores through the facts asked as questions",
                "both": "; edits through the prompts and their questions, scores the mean of both"}
WORDING_NOTE = {"prompt": "", "question": ", edited and scored through their questions",
                "both": ", edited and scored through their prompts and questions"}
CHECK_CANDIDATES = 4   # candidates of the check on a longer stream (with check_turns > 0)
FILL = 0.85   # the share of the time left that the schedule is sized for
KNOWN_SHARE = 0.25   # of the budget, at most, to look for tuning facts the model knows


# ---------------------------------------------------------------------- the search space
def _n_layers(model) -> int:
    from .modules import _n_layers as n_layers

    return n_layers(getattr(model, "config", None))


def module_families(model, families: Optional[Sequence[str]] = None) -> List[str]:
    """Module name templates with ``{i}`` for the layer: ``families`` as given (a suffix such as
    ``mlp.up_proj`` is put under the model's layer list), default the MLP output projection."""
    from .modules import mlp_output_template

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base = mlp_output_template(model)
    out = []
    for fam in families or ([base] if base else []):
        if "{i}" not in fam:
            if base is None:
                raise ValueError(f"no layer list known for model_type {model_type!r}; give "
                                 f"families as templates with {{i}}, e.g. "
                                 f"'model.layers.{{i}}.mlp.down_proj'")
            fam = base[:base.index("{i}") + 3] + "." + fam
        out.append(fam)
    if not out:
        raise ValueError(f"no default module family for model_type {model_type!r}; give "
                         f"families=['<layers>.{{i}}.<module>']")
    return out


def layer_windows(n_layers: int) -> List[Tuple[int, int]]:
    """Four windows of about ``n_layers / 6`` layers (first, last; inclusive), starting at 7%,
    14%, 40% and 80% of the depth (30 layers: 2-6, 4-8, 12-16, 24-28); duplicates dropped."""
    width = max(1, round(n_layers / 6))
    out = []
    for f in WINDOW_STARTS:
        first = min(int(f * n_layers + 0.5), n_layers - width)
        w = (max(0, first), min(n_layers - 1, max(0, first) + width - 1))
        if w not in out:
            out.append(w)
    return out


def search_space(model, families: Optional[Sequence[str]] = None,
                 grid: Optional[Dict[str, Sequence[Any]]] = None) -> Dict[str, Any]:
    """The searched values for ``model`` (a JSON-able dict, recorded in the preset); ``grid``
    replaces the values of some fields (``lr``, ``steps``, ``positions``, ``hold_done``,
    ``hold_margin``, ``memory``, ``preserve``, ``protect_mean``, ``whiten``, ``windows``)."""
    from .modules import module_layout

    n = _n_layers(model)
    named = dict(model.named_modules())
    fams = module_families(model, families)
    for fam in fams:
        if fam.format(i=0) not in named:
            raise ValueError(f"module family {fam!r}: the model has no module "
                             f"{fam.format(i=0)!r}")
        try:
            module_layout(named[fam.format(i=0)])
        except TypeError as err:
            raise ValueError(f"module family {fam!r}: {err}") from None
    space = {"n_layers": n, "families": fams, "windows": [list(w) for w in layer_windows(n)],
             "positions": list(POSITIONS), "lr": list(LR_GRID), "steps": list(STEPS_GRID),
             "hold_done": [False, True], "hold_margin": list(HOLD_MARGIN_GRID),
             "memory": list(MEMORY_GRID),
             "preserve": list(PRESERVE_GRID), "protect_mean": list(PROTECT_GRID),
             "whiten": list(WHITEN_GRID)}
    for key, values in (grid or {}).items():
        if key not in space or key in ("n_layers", "families"):
            raise ValueError(f"grid: unknown field {key!r}; give some of "
                             f"{[k for k in space if k not in ('n_layers', 'families')]}")
        values = [list(v) if isinstance(v, (list, tuple)) else v for v in values]
        if not values:
            raise ValueError(f"grid: no values for {key!r}")
        if key == "windows":
            bad = [w for w in values if not 0 <= w[0] <= w[1] < n]
            if bad:
                raise ValueError(f"grid: windows {bad} are not within the model's layers "
                                 f"0-{n - 1}")
        space[key] = values
    return space


def _grid(space: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every point of ``space`` (``hold_done`` only with more than one step, a nonzero
    ``hold_margin`` only with ``hold_done``)."""
    out = []
    for fam, win, pos, lr, steps, hold, margin, mem, pres, prot, white in itertools.product(
            space["families"], space["windows"], space["positions"], space["lr"],
            space["steps"], space["hold_done"], space.get("hold_margin", [0.0]),
            space["memory"], space["preserve"], space["protect_mean"],
            space.get("whiten", [0.0])):
        if (hold and steps == 1) or (margin and not hold):
            continue
        out.append({"family": fam, "window": list(win), "positions": pos, "lr": lr,
                    "steps": steps, "hold_done": hold, "hold_margin": margin, "memory": mem,
                    "preserve": pres, "protect_mean": prot, "whiten": white})
    return out


def _config_of(point: Dict[str, Any]) -> EditConfig:
    a, b = point["window"]
    mods = [point["family"].format(i=i) for i in range(a, b + 1)]
    return EditConfig(modules=tuple(mods), lr=point["lr"], steps=point["steps"],
                      hold_done=point["hold_done"],
                      hold_margin=point.get("hold_margin", 0.0), positions=point["positions"],
                      memory=point["memory"], preserve=point["preserve"],
                      protect_mean=point["protect_mean"], whiten=point.get("whiten", 0.0))


def label(config: EditConfig) -> str:
    """A short description of a candidate's searched fields."""
    mods = list(config.modules or ["default modules"])
    groups: Dict[str, List[str]] = {}
    for m in mods:
        parts = m.split(".")
        j = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        fam, layer = (m, "") if j is None else (".".join(parts[j + 1:]), parts[j])
        groups.setdefault(fam, []).append(layer)
    where = " + ".join(
        f"{fam} {ls[0]}-{ls[-1]}" if len(ls) > 1 else f"{fam} {ls[0]}".rstrip()
        for fam, ls in groups.items())
    return (f"{where} @{config.positions} lr {config.lr:g} steps {config.steps}"
            f"{' hold' if config.hold_done else ''}"
            f"{f' margin {config.hold_margin:g}' if config.hold_margin else ''}"
            f" mem {config.memory:g} pres {config.preserve:g} prot {config.protect_mean:g}"
            + (f" whiten {config.whiten:g}" if config.whiten else ""))


# ---------------------------------------------------------------------- schedule and rule
def round_sizes(edits_per_turn: int, eta: int, rounds: int) -> List[int]:
    """Edits per turn of each round: the last has ``edits_per_turn``, each earlier ``1/eta``
    of the next (at least 1)."""
    return [max(1, math.ceil(edits_per_turn / eta ** (rounds - 1 - r))) for r in range(rounds)]


def plan_schedule(n0: int, edits_per_turn: int, eta: int, rounds: int) -> List[Dict[str, int]]:
    """``[{"candidates", "edits_per_turn"}]`` per round: ``n0`` candidates in round 0, then
    ``ceil(n / eta)`` of the previous round's, but at least 2 (a round of one cannot choose)
    where the previous round had 2 or more."""
    out, n = [], n0
    for e in round_sizes(edits_per_turn, eta, rounds):
        out.append({"candidates": n, "edits_per_turn": e})
        n = max(min(2, n), math.ceil(n / eta))
    return out


def rank_key(row: Dict[str, Any], ls_target: float) -> Tuple:
    """Sort key of the rule (smaller is better): feasible rows (LS >= target) by ES, descending,
    then fewer forward+backward passes, then the earlier candidate; after them the others by
    LS, then ES, descending."""
    es, ls = row["es"] or 0.0, row["ls"] if row["ls"] is not None else 0.0
    if row.get("error"):
        return (2, row["candidate"])
    if ls >= ls_target:
        return (0, -es, row["passes"], row["candidate"])
    return (1, -ls, -es, row["passes"], row["candidate"])


def pick(rows: Sequence[Dict[str, Any]], ls_target: float
         ) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """The rule's pick among ``rows`` of ONE round (None when empty) and how it was made when
    no row met the LS target (None when one did, or when every row failed). The best by
    :func:`rank_key` when it meets the target. When none does, candidate 0 (the current config,
    ``"current config"``) unless rows beat it on both ES and LS (:func:`beats`), then the best
    of those by :func:`rank_key`, the highest LS, then ES (``"beats current config"``); without
    a scored candidate 0, the highest LS (``"highest LS"``). Why not simply the highest LS: on
    the embedded model that pick edited less than the current config over 300 edits and broke
    the model over 1,000 (``experiments/tuning.md``, fifteenth measurement)."""
    if not rows:
        return None, None
    best = min(rows, key=lambda r: rank_key(r, ls_target))
    if best.get("error") or (best["ls"] is not None and best["ls"] >= ls_target):
        return best, None
    current = next((r for r in rows if r["candidate"] == 0 and not r.get("error")), None)
    if current is None:
        return best, "highest LS"
    better = [r for r in rows if beats(r, current)]
    if not better:
        return current, "current config"
    return min(better, key=lambda r: rank_key(r, ls_target)), "beats current config"


def choose(rows: Sequence[Dict[str, Any]], ls_target: float) -> Optional[Dict[str, Any]]:
    """The rule's pick among ``rows`` of ONE round (None when empty): :func:`pick`'s row."""
    return pick(rows, ls_target)[0]


def beats(row: Dict[str, Any], other: Dict[str, Any]) -> bool:
    """Whether ``row`` scored at least ``other``'s teacher-forced ES and LS and more on one."""
    if row.get("error") or row["es"] is None or row["ls"] is None:
        return False
    return (row["es"] >= other["es"] and row["ls"] >= other["ls"]
            and (row["es"] > other["es"] or row["ls"] > other["ls"]))


def trade_offs(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The ES/LS trade-offs among ``rows`` of ONE round: the rows no other row beats on both
    teacher-forced ES and LS (higher is better; equal on both: the earlier candidate), by ES
    descending. What a user reads to pick another ``--ls-target`` when the rule's pick edits
    too little."""
    ok = [r for r in rows if not r.get("error") and r["es"] is not None and r["ls"] is not None]
    front = [r for r in ok
             if not any((o["es"] >= r["es"] and o["ls"] >= r["ls"])
                        and (o["es"] > r["es"] or o["ls"] > r["ls"]
                             or o["candidate"] < r["candidate"]) for o in ok)]
    return sorted(front, key=lambda r: (-r["es"], -r["ls"], r["candidate"]))


# the pick "barely edits" when its ES exceeds the current config's by less than this
WEAK_GAIN = 0.05


def survivors(rows: Sequence[Dict[str, Any]], keep: int, ls_target: float
              ) -> List[Dict[str, Any]]:
    """The ``keep`` rows of a round that go on to the next: the best ``ceil(keep / 2)`` by the
    rule (:func:`rank_key`), candidate 0 (the model's current config: what the pick is
    compared with), then the round's ES/LS trade-offs (:func:`trade_offs`, highest ES first)
    not among them, then the rule's next best. Why: ranked by the rule alone, a model whose
    strong edits all fall short of the LS target sends only near no-ops to the last round, and
    the full protocol then measures no trade-off a user could choose instead."""
    ranked = sorted(rows, key=lambda row: rank_key(row, ls_target))
    out = ranked[:(keep + 1) // 2]
    chosen = {row["candidate"] for row in out}
    current = [row for row in ranked if row["candidate"] == 0]
    for row in current + trade_offs(rows) + ranked:
        if len(out) >= keep:
            break
        if row["candidate"] not in chosen and not row.get("error"):
            out.append(row)
            chosen.add(row["candidate"])
    return out


# ---------------------------------------------------------------------- files
def write_preset(preset: Dict[str, Any], path) -> None:
    """Write ``preset`` to ``path`` atomically (a temporary file renamed over it)."""
    from .serialization import write_json_atomic

    write_json_atomic(preset, path)


def tuning_records(model, tokenizer, n: int, seed: int = 0, known: bool = True,
                   deadline: Optional[float] = None):
    """``n`` counterfactual records of the tuning relations only (see the module docstring).
    ``known``: facts the model answers right, looked for until ``deadline`` (a
    ``time.perf_counter()`` value; ValueError after it, suggesting ``known=False``)."""
    from .data import TUNING_RELATIONS, drop_edited_locality, offline_facts

    if known:
        from .eval import offline_records

        try:
            records = offline_records(model, tokenizer, n, relations=TUNING_RELATIONS,
                                      seed=seed, split="tuning", deadline=deadline)
        except ValueError as err:
            raise ValueError(f"tune: {err}; tune on the first tuning facts instead (--no-known, "
                             f"known=False): the edits are counterfactual either way") from None
    else:
        records = offline_facts(TUNING_RELATIONS, seed=seed, limit=n, n_locality=3,
                                split="tuning")
        if len(records) < n:
            raise ValueError(f"only {len(records)} tuning facts; {n} needed")
        records = drop_edited_locality(records)
    outside = sorted({r.relation for r in records} - set(TUNING_RELATIONS))
    if outside:   # never: the split refuses them; a guard that the search stays on tuning facts
        raise RuntimeError(f"tuning records of relations {outside} outside the tuning split")
    return records


# ---------------------------------------------------------------------- the search
class TuneInterrupted(RuntimeError):
    """The search was interrupted before any candidate finished: nothing to choose from."""


@dataclass
class TuneResult:
    """What :func:`tune` returns: ``preset`` (the file's contents), ``rows`` (every scored
    candidate), ``chosen`` (the rule's pick), ``stopped`` (``done``, ``budget``,
    ``interrupted``) and ``weak_note`` (:func:`weak_pick_note` when the pick edits barely more
    than the current config, or less; else None)."""
    preset: Dict[str, Any]
    rows: List[Dict[str, Any]] = field(default_factory=list)
    chosen: Optional[Dict[str, Any]] = None
    stopped: str = "done"
    weak_note: Optional[str] = None


class _Weights:
    """The unedited weights of every module a candidate edits, restored after it."""

    def __init__(self, model):
        self.named = dict(model.named_modules())
        self.saved: Dict[str, Any] = {}

    def remember(self, names):
        for n in names:
            if n not in self.saved:
                self.saved[n] = self.named[n].weight.detach().clone()

    def restore(self):
        import torch

        with torch.no_grad():
            for n, w in self.saved.items():
                self.named[n].weight.copy_(w)


def _score(model, tokenizer, records, ref, config: EditConfig, turns: int, per_turn: int,
           weights: _Weights, seed: int, wordings: str = "prompt") -> Dict[str, Any]:
    """Edit ``records`` (``turns`` x ``per_turn``) from the unedited model with ``config``, each
    in ``wordings`` (:func:`ultraedit.eval.edit_requests`), and score them teacher-forced in the
    same wordings (:func:`ultraedit.eval.scored_records`); the weights are restored afterwards."""
    import torch

    from .editor import UltraEditor
    from .eval import edit_requests, evaluate_records, scored_records

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    quiet = warnings.catch_warnings()
    with quiet:   # expected for some candidates; one line per candidate is the progress
        warnings.filterwarnings("ignore", message="edit requests carry subjects")
        warnings.filterwarnings("ignore", message="the update is exactly zero")
        editor = UltraEditor(model, tokenizer, config)
        weights.remember(editor.modules)
        passes = turn_s = 0.0
        steps_run = 0
        try:
            for t in range(turns):
                chunk = records[t * per_turn:(t + 1) * per_turn]
                rep = editor.edit([q for r in chunk for q in edit_requests(r, wordings)])
                steps_run += rep.steps_run
                # forward+backward passes: one capture per step run, plus the check that ended
                # the turn early (held edits)
                passes += rep.steps_run + (1 if rep.steps_run < config.steps else 0)
                turn_s += rep.turn_s
            te = time.perf_counter()
            res = evaluate_records(model, tokenizer,
                                   scored_records(records[:turns * per_turn], wordings),
                                   locality_reference=ref, portability=False)
            eval_s = time.perf_counter() - te
        finally:
            weights.restore()
    return {"es": res["es"], "gs": res["gs"], "ls": res["ls"], "steps_run": steps_run,
            "passes": int(passes), "edit_s": turn_s, "eval_s": eval_s,
            "preserve_s": editor.preserve_s, "wall_s": time.perf_counter() - t0}


class _Cost:
    """Predicted seconds of a candidate: edits x steps x seconds per edit-step, plus edits x
    evaluation seconds per edit, plus the preserved-key capture of a window not yet captured;
    fitted to the first candidate, corrected by every later one."""

    def __init__(self):
        self.per_step = self.per_eval = None
        self.capture = 0.0
        self.capture_seen = False
        self.captured: set = set()
        self.factor = 1.0

    def steps(self, config: EditConfig) -> float:
        return config.steps * (0.8 if config.hold_done else 1.0)

    def predict(self, config: EditConfig, edits: int) -> float:
        if self.per_step is None:
            return 0.0
        cap = (self.capture if config.preserve > 0 and tuple(config.modules or ())
               not in self.captured else 0.0)
        return self.factor * edits * (self.steps(config) * self.per_step + self.per_eval) + cap

    def observe(self, config: EditConfig, edits: int, row: Dict[str, Any]) -> None:
        if config.preserve > 0:
            self.captured.add(tuple(config.modules or ()))
        if self.per_step is None:
            # steps_run counts each turn's steps; every edit goes through its own turn's
            steps_per_edit = max(1.0, row["steps_run"] / max(1, row["turns"]))
            self.per_step = row["edit_s"] / max(1, edits * steps_per_edit)
            self.per_eval = row["eval_s"] / max(1, edits)
            # a capture is one forward over ~2,500 short texts, cut after the deepest edited
            # module: about a tenth of a request's forward+backward each
            self.capture = row["preserve_s"] or 2500 * self.per_step / 10
            self.capture_seen = bool(row["preserve_s"])
            return
        pred = self.predict(config, edits)
        if pred > 0:
            seen = row["wall_s"] - (row["preserve_s"] or 0.0)
            base = pred - (self.capture if row["preserve_s"] else 0.0)
            ratio = max(0.3, min(3.0, seen / max(1e-9, base / self.factor)))
            self.factor = 0.5 * self.factor + 0.5 * ratio
        if row["preserve_s"]:   # measured: replaces the first guess, then the largest seen
            self.capture = (max(self.capture, row["preserve_s"]) if self.capture_seen
                            else row["preserve_s"])
            self.capture_seen = True


def tune(model, tokenizer, *, budget_s: float = 45 * 60, seed: int = 0,
         ls_target: float = DEFAULT_LS_TARGET, turns: int = 2, edits_per_turn: int = 50,
         eta: int = 3, rounds: int = 3, candidates: Optional[int] = None,
         families: Optional[Sequence[str]] = None, known: bool = True,
         name: str = "tuned", log: Callable[[str], None] = lambda s: None,
         model_name: Optional[str] = None, records: Optional[Sequence[Any]] = None,
         grid: Optional[Dict[str, Sequence[Any]]] = None,
         wordings: str = "prompt", check_turns: int = 0,
         check_candidates: int = CHECK_CANDIDATES) -> TuneResult:
    """Search a preset for ``model`` within ``budget_s`` seconds (see the module docstring).

    ``candidates``: round-0 candidates (default: as many as the budget allows, sized after the
    first candidate). ``log`` receives one line per scored candidate and per round. The
    returned ``preset`` is in the format of ``ultraedit/presets`` plus a ``tuning`` record.
    ``records``: the tuning facts (default :func:`tuning_records`); at least ``turns x
    edits_per_turn``, every one of a tuning relation (else ValueError). ``grid``: see
    :func:`search_space`. ``wordings``: the wording every candidate edits through and is scored
    in (:data:`ultraedit.eval.EDIT_WORDINGS`): ``"prompt"``, the rewrite prompts; ``"question"``,
    the same facts asked as the WILD-style scores ask them (ES on ``"Q: <question>\\nA:"``, GS on
    the paraphrases' questions, LS on the locality questions); ``"both"``, the two, each score
    the mean over both. A search in a question wording needs records with questions (the
    offline facts have them; else ValueError). ``check_turns``: when > 0, a last round on a
    longer lifelong stream: ``check_candidates`` of the schedule's last round
    (:func:`survivors`) each edit ``check_turns`` turns of ``edits_per_turn`` facts, and the
    pick comes from it (0: no check, the pick comes from the schedule's last round)."""
    import torch

    from .eval import scored_records
    from .eval.wild import check_wordings

    check_wordings(wordings)

    if not 0 <= ls_target <= 1:
        raise ValueError(f"ls_target must be in 0..1, got {ls_target!r}")
    if turns < 1 or edits_per_turn < 1 or eta < 2 or rounds < 1:
        raise ValueError("turns and edits_per_turn must be >= 1, eta >= 2 and rounds >= 1")
    if candidates is not None and candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if check_turns < 0 or (check_turns and check_candidates < 1):
        raise ValueError(f"check_turns must be >= 0 and check_candidates >= 1, got "
                         f"{check_turns} and {check_candidates}")
    t_start = time.perf_counter()
    deadline = t_start + budget_s
    space = search_space(model, families, grid)
    # candidate 0: the config the model gets now; then the grid in a seeded random order (built
    # before the facts are selected: a value no config takes fails here, in a second)
    current = EditConfig.for_model(model)
    if current.modules is None:
        from .modules import default_module_names

        current = current.replace(modules=tuple(default_module_names(model, current.positions)))
    order = _grid(space)
    random.Random(seed).shuffle(order)
    pool = [("current", current)] + [("grid", c) for c in map(_config_of, order) if c != current]
    if candidates is not None and candidates > len(pool):
        log(f"--candidates {candidates}: the search space holds {len(pool)}; scoring those")
        candidates = len(pool)
    rule = DEFAULT_RULE.format(target=ls_target) + WORDING_RULE[wordings]
    log(f"rule (fixed before the search): {rule}")
    from .data import REPORT_RELATIONS, TUNING_RELATIONS
    from .eval import locality_reference

    longest = max(turns, check_turns)
    need = longest * edits_per_turn
    if records is None:   # looking for known facts may take a quarter of the budget
        records = tuning_records(model, tokenizer, need, seed=seed, known=known,
                                 deadline=t_start + KNOWN_SHARE * budget_s)
    else:
        records = list(records)[:need]
        outside = sorted({str(r.relation) for r in records} - set(TUNING_RELATIONS))
        if outside:
            raise ValueError(f"tune: records of relations {outside} are not tuning relations "
                             f"{list(TUNING_RELATIONS)}; a preset is chosen on those only")
        if len(records) < need:
            raise ValueError(f"tune: {len(records)} records; {longest} turns x "
                             f"{edits_per_turn} edits need {need}")
    if wordings != "prompt" and not any(r.questions.get(r.prompt) for r in records):
        raise ValueError(f"tune: wordings={wordings!r} edits through the records' questions, "
                         f"and none of the {len(records)} records asks its rewrite prompt as a "
                         f"question; use wordings='prompt'")
    ref = locality_reference(model, tokenizer, scored_records(records, wordings))
    prep_s = time.perf_counter() - t_start
    log(f"{len(records)} tuning facts ({', '.join(TUNING_RELATIONS)}) and their unedited "
        f"locality predictions in {prep_s:.0f}s")

    sizes = round_sizes(edits_per_turn, eta, rounds)
    # the turns of each round: the schedule's rounds, then the check on the longer stream
    round_turns = [turns] * rounds + ([check_turns] if check_turns else [])
    sizes_all = sizes + ([edits_per_turn] if check_turns else [])
    weights = _Weights(model)
    cost = _Cost()
    rows: List[Dict[str, Any]] = []
    schedule: Optional[List[Dict[str, int]]] = None
    stopped = "done"
    round_rows: List[List[Dict[str, Any]]] = []
    entrants: List[Tuple[int, str, EditConfig]] = []
    resized: List[Dict[str, Any]] = []   # round 0's size as the cost model learned

    def run_one(r: int, idx: int, source: str, config: EditConfig, total: int, k: int):
        per, n_turns = sizes_all[r], round_turns[r]
        where = "check" if r == rounds else f"round {r}"
        row = {"candidate": idx, "round": r, "source": source, "label": label(config),
               "config": {f: _json(getattr(config, f)) for f in SEARCHED},
               "turns": n_turns, "edits_per_turn": per, "edits": n_turns * per}
        try:
            row.update(_score(model, tokenizer, records, ref, config, n_turns, per, weights,
                              seed, wordings))
        except Exception as err:  # a setting that fails is a failed candidate, not the search
            weights.restore()
            row.update({"es": None, "gs": None, "ls": None, "steps_run": 0, "passes": 0,
                        "edit_s": 0.0, "eval_s": 0.0, "preserve_s": 0.0, "wall_s": 0.0,
                        "error": f"{type(err).__name__}: {err}"})
            rows.append(row)
            round_rows[r].append(row)
            log(f"[{where} {k}/{total}] #{idx} {row['label']} | failed: {row['error']}")
            return row
        row["predicted_s"] = cost.predict(config, n_turns * per) if cost.per_step else None
        cost.observe(config, n_turns * per, row)
        rows.append(row)
        round_rows[r].append(row)
        left = deadline - time.perf_counter()
        log(f"[{where} {k}/{total}] #{idx} {row['label']} | ES {row['es']:.3f} GS "
            f"{_f(row['gs'])} LS {row['ls']:.3f} | {row['passes']} passes {row['wall_s']:.0f}s "
            f"| {max(0.0, left) / 60:.1f} min left")
        return row

    def promote(r: int, keep: int) -> List[Tuple[int, str, EditConfig]]:
        """The entrants of the round after ``r``: its ``keep`` survivors (:func:`survivors`)."""
        by_idx = {i: (src, cfg) for i, src, cfg in entrants}
        return [(row["candidate"],) + by_idx[row["candidate"]]
                for row in survivors(round_rows[r], keep, ls_target)]

    def run_round(r: int, n_turns: int, per: int) -> bool:
        """Score round ``r``'s entrants; False when the budget stopped it before one."""
        round_rows.append([])
        for k, (idx, src, cfg) in enumerate(entrants, 1):
            if not _fits(cost, cfg, n_turns * per, deadline, idx, log):
                return False
            run_one(r, idx, src, cfg, len(entrants), k)
        return True

    try:
        for r in range(rounds):
            if r == 0:
                round_rows.append([])
                check_s = (lambda: check_candidates * cost.predict(
                    current, check_turns * edits_per_turn)) if check_turns else (lambda: 0.0)
                n0 = _round0(run_one, cost, pool, sizes, turns, eta, rounds, candidates,
                             deadline, edits_per_turn, log, resized, reserve=check_s)
                schedule = plan_schedule(n0, edits_per_turn, eta, rounds)
                if resized and resized[-1]["stopped"]:
                    stopped = "budget"
                    break
                entrants = [(i, src, cfg) for i, (src, cfg) in enumerate(pool[:n0])]
                continue
            entrants = promote(r - 1, schedule[r]["candidates"])
            log(f"round {r}: {len(entrants)} survivors on {turns} turns of {sizes[r]} edits")
            if not run_round(r, turns, sizes[r]):
                stopped = "budget"
                break
        if check_turns and stopped == "done":
            entrants = promote(rounds - 1, check_candidates)
            schedule.append({"candidates": len(entrants), "edits_per_turn": edits_per_turn,
                             "turns": check_turns})
            log(f"check: {len(entrants)} candidates on a longer stream, {check_turns} turns of "
                f"{edits_per_turn} edits")
            if not run_round(rounds, check_turns, edits_per_turn):
                stopped = "budget"
    except KeyboardInterrupt:
        stopped = "interrupted"
        log("interrupted: choosing among the candidates scored so far")
        weights.restore()
        if schedule is None:    # stopped in round 0: the schedule planned so far
            schedule = plan_schedule(max(1, len(round_rows[0]) if round_rows else 1),
                                     edits_per_turn, eta, rounds)

    last = next((rr for rr in reversed(round_rows) if rr), [])
    chosen, fallback = pick(last, ls_target)
    if chosen is None:
        if stopped == "interrupted":
            raise TuneInterrupted("interrupted before a candidate finished")
        raise RuntimeError("no candidate was scored within the budget; give a larger budget")
    if chosen.get("error"):
        raise RuntimeError(f"every candidate of the last round failed, e.g. {chosen['error']}")
    config = pool[chosen["candidate"]][1]
    feasible = fallback is None
    fronts = [{"round": r, "edits": rr[0]["edits"],
               "rows": [{k: row[k] for k in ("candidate", "label", "es", "gs", "ls", "passes")}
                        for row in trade_offs(rr)]}
              for r, rr in enumerate(round_rows) if rr]
    baseline = next((row for row in round_rows[chosen["round"]] if row["candidate"] == 0
                     and not row.get("error")), None)
    weak = (baseline is not None and chosen["candidate"] != 0
            and chosen["es"] - baseline["es"] < WEAK_GAIN)
    fallback_text = {
        None: "",
        "highest LS": f" (no candidate reached LS {ls_target}: the highest LS)",
        "current config": f" (no candidate reached LS {ls_target} and none beat the current "
                          f"config on both ES and LS: the current config is kept)",
        "beats current config": f" (no candidate reached LS {ls_target}: the highest LS of "
                                f"those that beat the current config on both ES and LS)"}[fallback]
    wall = time.perf_counter() - t_start
    paper = EditConfig().to_dict()
    config_out = {k: _json(v) for k, v in config.to_dict().items()
                  if k in SEARCHED or v != paper[k]}
    fp = model_fingerprint(model)
    preset = {
        "name": name,
        "description": (
            f"Tuned by `ultraedit tune` on the tuning relations ({', '.join(TUNING_RELATIONS)}; "
            f"offline facts, seed {seed}){WORDING_NOTE[wordings]}: {label(config)}. "
            f"Teacher-forced on the last round's "
            f"{chosen['edits']} edits ({chosen['turns']} lifelong turns): ES {chosen['es']:.3f}, GS "
            f"{_f(chosen['gs'])}, LS {chosen['ls']:.3f}"
            + fallback_text
            + "."),
        "fingerprint": fp,
        "config": config_out,
        "tuning": {
            "rule": rule, "ls_target": ls_target, "met_target": feasible, "fallback": fallback,
            "split": "tuning", "relations": list(TUNING_RELATIONS),
            "report_relations_used": False, "report_relations": list(REPORT_RELATIONS),
            "facts": len(records), "known_only": known, "seed": seed,
            "edit_wordings": wordings,
            "model": model_name, "budget_s": budget_s, "wall_s": wall, "stopped": stopped,
            "prepare_s": prep_s, "eta": eta, "rounds": rounds, "turns": turns,
            "check_turns": check_turns,
            "check_candidates": check_candidates if check_turns else 0,
            "edits_per_turn": edits_per_turn, "schedule": schedule, "resized": resized,
            "space": space,
            "grid_size": len(pool) - 1, "chosen": chosen["candidate"],
            "chosen_round": chosen["round"], "candidates": rows,
            "trade_offs": fronts, "weak_pick": weak,
            "cost_model": {"s_per_edit_step": cost.per_step, "eval_s_per_edit": cost.per_eval,
                           "capture_s": cost.capture, "factor": cost.factor},
            "threads": torch.get_num_threads(),
        },
    }
    log(f"chosen #{chosen['candidate']} (round {chosen['round']}): {label(config)} | ES "
        f"{chosen['es']:.3f} LS {chosen['ls']:.3f}{fallback_text}; "
        f"{wall / 60:.1f} min, stopped: {stopped}")
    for front in fronts:
        log(f"ES/LS trade-offs of round {front['round']} ({front['edits']} edits): "
            + "; ".join(f"#{r['candidate']} ES {r['es']:.3f} LS {r['ls']:.3f}"
                        for r in front["rows"]))
    note = weak_pick_note(chosen["es"], baseline, ls_target) if weak else None
    if note:
        log(note + "; the trade-offs above say what a lower --ls-target buys")
    return TuneResult(preset=preset, rows=rows, chosen=chosen, stopped=stopped, weak_note=note)


def weak_pick_note(chosen_es: float, baseline: Dict[str, Any], ls_target: float) -> str:
    """What the log and the command say when the pick's ES is within :data:`WEAK_GAIN` of the
    current config's (``baseline``, candidate 0's row of the same round) or below it."""
    how = "barely more than" if chosen_es >= baseline["es"] else "less than"
    ls = "" if baseline.get("ls") is None else f" LS {baseline['ls']:.3f}"
    return (f"note: the pick edits {how} the current config (#0, ES {baseline['es']:.3f}{ls}): "
            f"no searched setting met LS >= {ls_target} with stronger edits on this model")


def _fits(cost: _Cost, config: EditConfig, edits: int, deadline: float, idx: int,
          log: Callable[[str], None]) -> bool:
    """Whether a candidate is predicted to finish before ``deadline`` (says so if not)."""
    need = cost.predict(config, edits)
    if time.perf_counter() + need <= deadline:
        return True
    log(f"budget: #{idx} would need {need:.0f}s, "
        f"{max(0.0, deadline - time.perf_counter()):.0f}s left; stopping")
    return False


def _round0(run_one, cost: _Cost, pool, sizes: List[int], turns: int, eta: int, rounds: int,
            candidates: Optional[int], deadline: float, edits_per_turn: int,
            log: Callable[[str], None], resized: List[Dict[str, Any]],
            reserve: Callable[[], float] = lambda: 0.0) -> int:
    """Score round 0 and return its size: ``candidates``, else sized after the first candidate
    and grown (never shrunk) after every later one while the predicted schedule still fits
    ``FILL`` of the time left less ``reserve()`` (the predicted seconds of the check on the
    longer stream). ``resized`` records each size with the time left."""
    n0 = candidates or 1     # tune() has clamped candidates to the pool
    i = 0
    while i < n0:
        src, cfg = pool[i]
        if i and not _fits(cost, cfg, turns * sizes[0], deadline, i, log):
            resized.append({"after": i, "candidates": i, "stopped": True})
            return i
        run_one(0, i, src, cfg, candidates or "?", i + 1)
        i += 1
        if candidates is None:
            left = deadline - time.perf_counter()
            # at least eta^(rounds-1) candidates, so that every round halves: on a budget that
            # the prediction says is too short, the budget check then ends the search in an
            # earlier round with the best so far rather than scoring one candidate throughout
            fit = min(len(pool), max(
                eta ** (rounds - 1),
                _fit_n0(cost, pool, sizes, turns, eta, FILL * left - reserve(), done=i,
                        max_n=len(pool)) if cost.per_step else 0))
            if fit > n0:
                n0 = fit
                resized.append({"after": i, "candidates": n0, "left_s": left,
                                "stopped": False})
                log("schedule: " + "; ".join(
                    f"round {k}: {s['candidates']} x {turns} turns of {s['edits_per_turn']}"
                    for k, s in enumerate(plan_schedule(n0, edits_per_turn, eta, rounds)))
                    + f" (sized after {i} candidate(s), {left / 60:.1f} min left)")
    return n0


def _fit_n0(cost: _Cost, pool, sizes: List[int], turns: int, eta: int, seconds: float,
            done: int, max_n: int) -> int:
    """The largest round-0 size whose rest (round 0's candidates from ``done`` on, then the
    later rounds) is predicted to fit ``seconds``; at least ``done``."""
    def predicted(n0: int) -> float:
        total, n = 0.0, n0
        for r, e in enumerate(sizes):
            cands = [cfg for _, cfg in pool[(done if r == 0 else 0):n]]
            total += sum(cost.predict(c, turns * e) for c in cands)
            n = max(min(2, n), math.ceil(n / eta))
        return total

    best = done
    for n0 in range(done, max_n + 1):
        if predicted(n0) <= seconds:
            best = n0
        elif n0 > best + 8:
            break
    return max(1, best)


def _json(v):
    return list(v) if isinstance(v, tuple) else v


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def default_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)

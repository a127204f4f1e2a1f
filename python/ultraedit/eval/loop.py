"""The lifelong loop shared by ``ultraedit demo`` and ``ultraedit run``.

:func:`lifelong_run` edits ``records`` in ``turns`` turns of ``edits_per_turn`` with one editor
(statistics carried across turns) and evaluates them:

* the unedited model's locality predictions are captured before the first edit
  (:func:`~ultraedit.eval.locality_reference`);
* ``eval_before``: every record once before editing (teacher-forced);
* ``eval_every``: after each turn, that turn's edits (teacher-forced; generation scores too with
  ``turn_generation``);
* ``eval_end``: once after the last turn over ALL edits (the paper's protocol), teacher-forced
  and, with ``generation``, greedy-generation scores and fluency;
* ``wild``: the WILD-style scores (:mod:`ultraedit.eval.wild`) in the final evaluation, and with
  ``turn_wild`` in the per-turn evaluation too, beside the teacher-forced ones (timed apart; the
  unedited answers to the locality prompts are decoded before the first edit);
* ``true_facts``: before the first edit, the unedited model's ES and GS against the records'
  TRUE answers (:func:`~ultraedit.eval.true_fact_scores`; WILD-style too when ``wild`` is on),
  the yardstick for the edits' GS: how often the model states a fact it knows through a
  paraphrase or a question. The evaluations after editing then also report ``gs_known``, GS
  over the paraphrases through which the unedited model completed the true answer.

It returns a result dict (``status``, ``edits``, ``turns`` with one row per turn, ``before``,
``final``, ``true_facts``, ``timing``, ``memory``) and hands it to ``on_update`` whenever it
changes, so that a caller can keep a file of the partial results. While it runs ``status``
names the stage (``"turn 3 of 10"``, ``"final evaluation"``, ...); at the end it is ``"done"``.
An interrupted run (Ctrl-C) is marked ``"status": "interrupted"`` before the interrupt goes on;
an error is recorded as ``error``, with ``"status": "failed in: <stage>"``, before it goes on.
Requests the editor would refuse (``check_requests``) raise before anything runs and before
``on_update`` is first called.

With ``progress``, bars on stderr show the locality reference and every evaluation batch, and
the editing bar moves once per micro-batch forward of every step of a turn.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

from .locality import locality_reference, locality_work
from .scores import (evaluate_records, evaluation_work, true_fact_scores, true_fact_work,
                     wild_evaluation, wild_work)
from .wild import check_wordings, edit_requests

__all__ = ["lifelong_run", "teacher_forced_scores", "generation_scores_of", "wild_scores_of"]


def _num(x) -> Optional[float]:
    return None if x is None else float(x)


def teacher_forced_scores(res: Dict[str, Any]) -> Dict[str, Any]:
    """The teacher-forced part of an :func:`~ultraedit.eval.evaluate_records` result."""
    out = {k: _num(res.get(k)) for k in ("es", "gs", "ls", "ls_data", "pt")}
    if "gs_known" in res:
        out["gs_known"] = _num(res["gs_known"])
    out["ls_source"] = res.get("ls_source")
    out["edits"] = int(res.get("n", 0))
    return out


def generation_scores_of(res: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The generation part of an :func:`~ultraedit.eval.evaluate_records` result (None when it
    was evaluated without generation)."""
    if "gen_es" not in res:
        return None
    out = {k: _num(res.get("gen_" + k)) for k in ("es", "gs", "ls", "pt")}
    out.update({k + "_prefix": _num(res.get(f"gen_{k}_prefix")) for k in ("es", "gs", "ls", "pt")})
    out["fluency"] = _num(res.get("fluency"))
    out["edits"] = int(res.get("n", 0))
    return out


def wild_scores_of(res: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The WILD-style part of an :func:`~ultraedit.eval.evaluate_records` result (None when it
    was evaluated without ``wild``)."""
    if "wild_es" not in res:
        return None
    out = {k: _num(res.get("wild_" + k)) for k in ("es", "gs", "ls", "pt")}
    out.update({k + "_contains": _num(res.get(f"wild_{k}_contains"))
                for k in ("es", "gs", "ls", "pt")})
    out["ls_source"] = res.get("wild_ls_source")
    out["edits"] = int(res.get("n", 0))
    out["examples"] = res.get("wild_examples", [])
    return out


def _bar(progress: bool, total: int, desc: str, unit: str, leave: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, file=sys.stderr,
                dynamic_ncols=True, leave=leave, mininterval=0)


@contextmanager
def _measured(progress: bool, total: int, desc: str, leave: bool = False) -> Iterator[Callable]:
    """A bar over ``total`` prompts; yields the ``progress`` callback the eval functions take."""
    bar = _bar(progress, total, desc, "prompt", leave=leave)
    try:
        yield bar.update
    finally:
        bar.close()


class _TurnProgress:
    """Moves the editing bar once per micro-batch of every forward of the model during a turn
    (a packed forward holds several, ``ultraedit.packing``), so the count tells the step and
    the micro-batch."""

    def __init__(self, bar, model, turn: int, turns: int, n_batches: int, steps: int):
        self.bar, self.model = bar, model
        self.turn, self.turns, self.n_batches, self.steps = turn, turns, n_batches, steps
        self.count = 0
        self.start = bar.n

    def _hook(self, module, args, output):
        from ..packing import batches_in_forward

        for _ in range(batches_in_forward()):   # a packed forward holds several micro-batches
            self._tick()

    def _tick(self):
        self.count += 1
        step = min(self.steps, (self.count - 1) // self.n_batches + 1)
        batch = (self.count - 1) % self.n_batches + 1
        self.bar.set_postfix_str(f"turn {self.turn}/{self.turns}, step {step}/{self.steps}, "
                                 f"micro-batch {batch}/{self.n_batches}", refresh=False)
        self.bar.update(1)

    @contextmanager
    def watch(self):
        handle = self.model.register_forward_hook(self._hook)
        try:
            yield
        finally:
            handle.remove()
        # a turn that ended early (every edit already held) skips its remaining steps
        self.bar.update(max(0, self.start + self.steps * self.n_batches - self.bar.n))


def _editor_setting(editor, name: str, default):
    config = getattr(editor, "config", None)
    if config is not None and hasattr(config, name):
        return getattr(config, name)
    return getattr(editor, name, default)


def _forwards_per_turn(editor, edits_per_turn: int) -> Tuple[int, int]:
    """``(steps, requests per micro-batch)`` of ``editor``, for the editing bar ("auto": as many
    as fit, the whole turn when it does)."""
    steps = int(_editor_setting(editor, "steps", 1))
    micro_batch = _editor_setting(editor, "micro_batch", 10)
    return steps, max(1, edits_per_turn) if micro_batch == "auto" else int(micro_batch)


def _wild_only(model, tokenizer, records, ref, progress: bool, desc: str) -> Dict[str, Any]:
    """The WILD-style scores of ``records`` (timed apart from the other scores)."""
    with _measured(progress, wild_work(records, ref), desc, leave=True) as tick:
        return wild_evaluation(model, tokenizer, records, ref, progress=tick)


def lifelong_run(model, tokenizer, records: Sequence[Any], editor, turns: int,
                 edits_per_turn: int, eval_before: bool = False, eval_every: bool = False,
                 eval_end: bool = True, generation: bool = False, turn_generation: bool = False,
                 progress: bool = True, result: Optional[Dict[str, Any]] = None,
                 wild: bool = False, turn_wild: bool = False, true_facts: bool = False,
                 on_update: Optional[Callable[[Dict[str, Any]], None]] = None,
                 wordings: str = "prompt",
                 on_turn: Optional[Callable[[Any, int], None]] = None,
                 resume: Optional[Callable[[], Tuple[Any, int]]] = None,
                 check_requests: bool = True) -> Dict[str, Any]:
    """Edit ``records`` with ``editor`` in lifelong turns and evaluate (see the module
    docstring); returns the result dict, ``result``'s keys kept. ``wordings`` chooses the
    requests each record gives the editor (:func:`~ultraedit.eval.edit_requests`).

    ``on_turn(editor, turn)`` runs after each turn (e.g. to save the lifelong state).
    ``resume()`` continues an earlier run: called once the unedited model has been scored and
    before the first turn, it returns ``(editor, turns_done)`` (e.g. ``UltraEditor.load_state``
    on this model and the state's turn count); ``editor`` may then be None, and the first
    ``turns_done`` turns' records count as edited without being edited again.
    ``check_requests=False`` skips the check of every turn's requests before any work, for a
    caller that has checked them itself."""
    records = list(records)
    check_wordings(wordings)      # before the long unedited reference, not at the first turn
    chunks = [records[t * edits_per_turn:(t + 1) * edits_per_turn] for t in range(turns)]
    chunks = [c for c in chunks if c]
    requests = [[q for r in c for q in edit_requests(r, wordings)] for c in chunks]
    notify = on_update or (lambda r: None)
    result = dict(result or {})
    result.update({"edits": len(records), "status": "running", "turns": [], "before": None,
                   "final": None, "true_facts": None})
    result.setdefault("timing", {})
    known = None   # the paraphrases the unedited model completes with the true answer
    check = getattr(editor, "check_requests", None) if check_requests else None
    if check is not None:     # every turn's requests, before any work or any file: a bad record
        for turn_requests in requests:   # in the last turn must not stop the run after the first
            check(turn_requests)
    stage = "running"

    def enter(name: str) -> None:     # the stage the JSON shows while it runs, or stopped in
        nonlocal stage
        stage = result["status"] = name
    try:
        enter("unedited locality reference")
        t0 = time.perf_counter()
        ref_generation = (generation and eval_end) or turn_generation
        with _measured(progress, locality_work(records, ref_generation),
                       "unedited locality reference") as tick:
            ref = locality_reference(model, tokenizer, records, generation=ref_generation,
                                     progress=tick)
        result["timing"]["locality_reference_s"] = time.perf_counter() - t0
        any_wild = (wild and eval_end) or (turn_wild and eval_every)
        if any_wild:   # timed apart: what WILD adds
            enter("unedited answers (WILD-style)")
            t0 = time.perf_counter()
            with _measured(progress, locality_work(records, reference=ref, wild=True),
                           "unedited answers (WILD-style)") as tick:
                locality_reference(model, tokenizer, records, reference=ref, wild=True,
                                   progress=tick)
            result["timing"]["wild_reference_s"] = time.perf_counter() - t0
        if true_facts:
            enter("unedited model on the true answers")
            t0 = time.perf_counter()
            with _measured(progress, true_fact_work(records, any_wild),
                           "unedited model on the true answers") as tick:
                true = true_fact_scores(model, tokenizer, records, wild=any_wild,
                                        progress=tick)
            known = true.pop("known_paraphrases")      # the JSON keeps their number
            result["true_facts"] = {**true, "known_paraphrases": len(known)}
            result["timing"]["true_facts_s"] = time.perf_counter() - t0
        if eval_before:
            enter("evaluation before editing")
            t0 = time.perf_counter()
            with _measured(progress, evaluation_work(records, ref), "evaluation before editing",
                           leave=True) as tick:
                res = evaluate_records(model, tokenizer, records, locality_reference=ref,
                                       progress=tick, known_paraphrases=known)
            result["before"] = {"teacher_forced": teacher_forced_scores(res)}
            result["timing"]["eval_before_s"] = time.perf_counter() - t0
        notify(result)

        turns_done = 0
        if resume is not None:
            enter("resuming")
            editor, turns_done = resume()
            if not 0 <= turns_done <= len(chunks):
                raise ValueError(f"the run to resume has made {turns_done} turns; this one has "
                                 f"{len(chunks)}")
        edited = sum(len(c) for c in chunks[:turns_done])
        if resume is not None:
            result["resumed"] = {"turns_done": turns_done, "edits_done": edited}
        steps, micro_batch = _forwards_per_turn(editor, edits_per_turn)
        batches = [math.ceil(len(q) / micro_batch) for q in requests]
        bar = _bar(progress, steps * sum(batches[turns_done:]), "editing", "micro-batch")
        try:
            for turn, (chunk, n_batches) in enumerate(zip(chunks, batches), 1):
                if turn <= turns_done:
                    continue
                enter(f"turn {turn} of {len(chunks)}")
                watcher = _TurnProgress(bar, model, turn, len(chunks), n_batches, steps)
                with watcher.watch():
                    rep = editor.edit(requests[turn - 1])
                edited += len(chunk)
                row: Dict[str, Any] = {
                    "turn": turn, "edits": len(chunk), "edits_total": edited,
                    "requests": len(requests[turn - 1]),
                    "tokens": rep.n_tokens, "loss": rep.loss, "fwd_bwd_s": rep.fwd_bwd_s,
                    "editor_s": rep.editor_s, "turn_s": rep.turn_s, "peak_bytes": rep.peak_bytes,
                    "peak_source": rep.peak_source, "capture_bytes": rep.capture_bytes,
                    "steps_run": rep.steps_run, "n_predicted": rep.n_predicted,
                    "micro_batch": getattr(rep, "micro_batch", None)}
                post = {"edits/s": f"{len(chunk) / rep.turn_s:.1f}" if rep.turn_s > 0 else "inf"}
                if eval_every:
                    enter(f"evaluation of turn {turn}")
                    te = time.perf_counter()
                    with _measured(progress, evaluation_work(chunk, ref, turn_generation),
                                   f"evaluating turn {turn}") as tick:
                        res = evaluate_records(model, tokenizer, chunk, locality_reference=ref,
                                               generation=turn_generation, progress=tick,
                                               known_paraphrases=known)
                    row["eval_s"] = time.perf_counter() - te
                    row["metrics"] = {"teacher_forced": teacher_forced_scores(res),
                                      "generation": generation_scores_of(res)}
                    if turn_wild:
                        te = time.perf_counter()
                        res = _wild_only(model, tokenizer, chunk, ref, progress,
                                         f"WILD-style evaluation of turn {turn}")
                        row["wild_eval_s"] = time.perf_counter() - te
                        row["eval_s"] += row["wild_eval_s"]
                        row["metrics"]["wild"] = wild_scores_of(res)
                    tf = row["metrics"]["teacher_forced"]
                    for k in ("es", "gs", "ls"):
                        if tf[k] is not None:
                            post[k.upper()] = f"{tf[k]:.2f}"
                bar.set_postfix(post)
                result["turns"].append(row)
                if on_turn is not None:
                    on_turn(editor, turn)
                notify(result)
        finally:
            bar.close()

        rows = result["turns"]
        edit_s = sum(r["turn_s"] for r in rows)
        result["timing"].update({
            "edit_s": edit_s, "turn_s_mean": edit_s / max(1, len(rows)),
            "fwd_bwd_s": sum(r["fwd_bwd_s"] for r in rows),
            "editor_s": sum(r["editor_s"] for r in rows),
            "eval_every_s": sum(r.get("eval_s", 0.0) for r in rows),
            "wild_every_s": sum(r.get("wild_eval_s", 0.0) for r in rows),
            "edits_per_s": sum(r["edits"] for r in rows) / edit_s if edit_s > 0 else None})
        if rows:
            result["memory"] = {"peak_bytes": max(r["peak_bytes"] for r in rows),
                                "peak_source": rows[0]["peak_source"],
                                "capture_bytes": max(r["capture_bytes"] for r in rows)}
        if eval_end:
            enter("final evaluation")
            notify(result)
            done = records[:edited]
            te = time.perf_counter()
            with _measured(progress, evaluation_work(done, ref, generation),
                           f"final evaluation of {len(done)} edits", leave=True) as tick:
                res = evaluate_records(model, tokenizer, done, locality_reference=ref,
                                       generation=generation, progress=tick,
                                       known_paraphrases=known)
            result["timing"]["eval_end_s"] = time.perf_counter() - te
            result["final"] = {"teacher_forced": teacher_forced_scores(res),
                               "generation": generation_scores_of(res), "wild": None,
                               "edits": len(done)}
            if wild:
                te = time.perf_counter()
                res = _wild_only(model, tokenizer, done, ref, progress,
                                 f"WILD-style evaluation of {len(done)} edits")
                result["timing"]["wild_end_s"] = time.perf_counter() - te
                result["timing"]["eval_end_s"] += result["timing"]["wild_end_s"]
                result["final"]["wild"] = wild_scores_of(res)
    except KeyboardInterrupt:
        result["status"] = "interrupted"
        notify(result)
        raise
    except Exception as err:    # the status names the stage it stopped in
        result["status"] = f"failed in: {stage}"
        result["error"] = f"{type(err).__name__}: {err}"
        notify(result)
        raise
    result["status"] = "done"
    notify(result)
    return result

"""Shared by the experiment scripts: the repository on sys.path and the demo protocol
(``run_demo``: lifelong turns with before/after teacher-forced scores) on top of
``ultraedit.eval.lifelong_run``."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (os.path.join(ROOT, "python"), ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_demo(model, tokenizer, records, turns, edits_per_turn, editor_kwargs=None, progress=True,
             evaluate_before=True):
    """Edit ``records`` in ``turns`` turns of ``edits_per_turn`` with
    ``ultraedit.editor.UltraEditor(model, tokenizer, **editor_kwargs)`` (looked up when called,
    so a prototype subclass put there is used) and score them before and after, as
    ``ultraedit demo`` does. Returns ``metrics.before/after`` (es, gs, ls), ``timing`` (per-turn
    lists, ``editor_overhead``), ``settings`` (the resolved config) and the per-turn rows."""
    import dataclasses

    import ultraedit.editor as editor_module
    from ultraedit.eval import lifelong_run

    editor = editor_module.UltraEditor(model, tokenizer, **(editor_kwargs or {}))
    run = lifelong_run(model, tokenizer, records, editor, turns, edits_per_turn,
                       eval_before=evaluate_before, eval_end=True, progress=progress)
    rows = run["turns"]
    fwd = [r["fwd_bwd_s"] for r in rows]
    ed = [r["editor_s"] for r in rows]
    scores = lambda part: None if part is None else {  # noqa: E731
        k: part["teacher_forced"][k] for k in ("es", "gs", "ls")}
    return {
        "edits": run["edits"],
        "settings": dataclasses.replace(editor.config, modules=tuple(editor.modules)).to_dict(),
        "metrics": {"before": scores(run["before"]), "after": scores(run["final"])},
        "timing": {"turn_s": [r["turn_s"] for r in rows], "fwd_bwd_s": fwd, "editor_s": ed,
                   "editor_overhead": sum(ed) / sum(fwd) if sum(fwd) > 0 else None,
                   "preserve_s": editor.preserve_s},
        "memory": run.get("memory"),
        "turns": rows,
    }

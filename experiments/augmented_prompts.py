"""Edits trained in several contexts: does it carry them to paraphrases and questions?

Each edit request ``(prompt, target, subject)`` of a turn is also given, in the same turn, as
``(context + " " + prompt, target, subject)`` for the first ``--contexts`` of :data:`CONTEXTS`:
generic left contexts with no relation or entity in them (ROME/MEMIT optimize their values
with random prefixes for the same reason). The preset's settings otherwise. Scores over the
original edits only: teacher-forced ES / GS / LS and WILD-style ES / GS / LS (questions,
greedy decoding to a stop string; "contains" too), after 2 turns of 25 on the shared tuning
records of experiments/generalization.py.

    PYTHONPATH=python python experiments/augmented_prompts.py --contexts 0 --json experiments/results/augmented_0.json
    PYTHONPATH=python python experiments/augmented_prompts.py --contexts 2 --json experiments/results/augmented_2.json
    PYTHONPATH=python python experiments/augmented_prompts.py --contexts 2 --placement after-subject \
        --json experiments/results/augmented_after_2.json
    PYTHONPATH=python python experiments/augmented_prompts.py --contexts 1 --subject-first-only \
        --records experiments/results/generalization_report.jsonl --json subject_first_1.json
"""
from __future__ import annotations

import argparse
import json

import _common

CONTEXTS = ("Here is something I read today.", "This is a short note.",
            "Let me tell you a fact.", "I learned this a while ago.")
# Generic asides inserted right after the subject (``--placement after-subject``): the subject's
# last-token key is the rewrite prompt's (a causal model sees only what precedes it), while the
# layers above read the edited subject through other wording.
ASIDES = (", as far as I know,", ", as many people know,", ", to put it simply,",
          ", in short,")


def with_aside(prompt: str, subject: str, aside: str):
    """``prompt`` with ``aside`` after the first occurrence of ``subject`` (None without one)."""
    at = prompt.find(subject) if subject else -1
    if at < 0:
        return None
    end = at + len(subject)
    return prompt[:end] + aside + prompt[end:]


def gs_by_prefix(model, tok, records):
    """Teacher-forced GS of the edited model split by the paraphrase's text before the subject:
    the rewrite prompt's (the same subject key at the edited layers), none (the subject first),
    or other text."""
    from ultraedit.eval.probing import token_accuracy

    groups = {"same_prefix": ([], []), "subject_first": ([], []), "other_prefix": ([], [])}
    for r in records:
        before = r.prompt[:r.prompt.find(r.subject)] if r.subject in r.prompt else None
        for p in r.paraphrases:
            at = p.find(r.subject)
            group = ("same_prefix" if before is not None and at >= 0 and p[:at] == before
                     else "subject_first" if at == 0 else "other_prefix")
            prompts, targets = groups[group]
            prompts.append(p)
            targets.append(r.target)
    out = {}
    for name, (prompts, targets) in groups.items():
        acc = token_accuracy(model, tok, prompts, targets) if prompts else []
        out[name] = {"n": len(acc), "gs": round(sum(acc) / len(acc), 3) if acc else None}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, default=2)
    ap.add_argument("--placement", choices=("before", "after-subject"), default="before",
                    help="generic left contexts before the prompt, or asides after the subject")
    ap.add_argument("--variant-steps", type=int, default=None, metavar="K",
                    help="train the variants only in a turn's first K steps (default: every step)")
    ap.add_argument("--subject-first-only", action="store_true",
                    help="variants only for requests whose prompt starts with the subject (whose "
                         "key is then the first token's, computed without any left context)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="an EditConfig field over the preset, e.g. key_contexts=4 (repeatable)")
    _common.add_stream_args(ap)
    a = ap.parse_args(argv)
    model, tok, records = _common.load_stream(a)

    from ultraedit import UltraEditor
    from ultraedit.turn import EditRequest, input_device, prepare_turn

    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.set)}
    editor = UltraEditor(model, tok, **overrides)
    real_edit = editor.edit
    contexts = (CONTEXTS if a.placement == "before" else ASIDES)[:a.contexts]

    def variants(r):
        if a.subject_first_only and not (r.subject and r.prompt.startswith(r.subject)):
            return []
        if a.placement == "before":
            return [EditRequest(f"{c} {r.prompt}", r.target, r.subject) for c in contexts]
        prompts = [with_aside(r.prompt, r.subject, c) for c in contexts]
        return [EditRequest(p, r.target, r.subject) for p in prompts if p is not None]

    real_capture, turn = editor._capture, {}

    def edit(requests):
        reqs = [EditRequest.coerce(r) for r in requests]
        if a.variant_steps is not None:   # the originals alone, batched as the editor does
            turn["plain"] = prepare_turn(editor.tokenizer, reqs, editor.config,
                                         input_device(editor.model), editor._max_length,
                                         editor.sizer)[1]
        return real_edit(reqs + [v for r in reqs for v in variants(r)])

    def capture(batches, size, meter, first):
        turn["step"] = 0 if first else turn["step"] + 1
        if a.variant_steps is not None and turn["step"] >= a.variant_steps:
            batches = turn["plain"]
        return real_capture(batches, size, meter, first)

    editor.edit, editor._capture = edit, capture
    _common.score_and_save(model, tok, records, editor, a,
                           post=lambda: {"gs_by_prefix": gs_by_prefix(model, tok, records)},
                           contexts=list(contexts), placement=a.placement, overrides=overrides,
                           variant_steps=a.variant_steps,
                           subject_first_only=a.subject_first_only)


if __name__ == "__main__":
    main()

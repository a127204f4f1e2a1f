"""What the free answers to questions become over 1,000 lifelong edits, by the edits' wording.

WILD-style locality counts a locality question as kept when the edited model's normalized
answer equals the unedited model's. This script splits the changed answers into kinds: an empty
answer (the model stops at once: its first token is a newline or a ``.``), an answer that now
names an edited target, and any other change; and the same for the edited facts' own questions
(``locality_erosion.py`` asks the same of cloze edits, by key distance, without the empty kind).
One process: the report relations' first ``--edits`` offline records (the selection of
``ultraedit run --data offline --split report``), the unedited answers, ``--turns`` lifelong
turns of the lifelong preset with bfloat16 products through ``--edit-wordings``
(``ultraedit.eval.edit_requests``), the answers again.

    python experiments/empty_answers.py --edit-wordings prompt --threads 1 \\
        --json experiments/results/empty_answers_report1000_prompt.json
"""
import argparse
import json
import sys
import time

import _common  # noqa: F401  (the repository on sys.path)


def kinds(before, after, targets):
    """Counts of the kinds of change from ``before`` to ``after`` answers (normalized)."""
    from ultraedit.eval import answer_contains, normalize_answer

    out = {"n": len(after), "unchanged": 0, "empty": 0, "empty_before": 0, "names_a_target": 0,
           "other": 0}
    for b, a in zip(before, after):
        b, a = normalize_answer(b), normalize_answer(a)
        out["empty_before"] += b == ""
        if a == b:
            out["unchanged"] += 1
        elif a == "":
            out["empty"] += 1
        elif any(answer_contains(a, t) for t in targets):
            out["names_a_target"] += 1
        else:
            out["other"] += 1
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edit-wordings", default="prompt", choices=("prompt", "question", "both"))
    p.add_argument("--edits", type=int, default=1000)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args(argv)
    from ultraedit.host_allocator import keep_freed_memory

    keep_freed_memory()
    import torch
    from ultraedit import EditConfig, UltraEditor
    from ultraedit.data import REPORT_RELATIONS
    from ultraedit.eval import (answer_exact, decode_answers, edit_requests, normalize_answer,
                                offline_records, wild_prompt)
    from ultraedit.models import load_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tok = load_model("default")
    t0 = time.perf_counter()
    records = offline_records(model, tok, args.edits, relations=REPORT_RELATIONS, split="report")
    edit_q = [wild_prompt(r.prompt, r.questions) for r in records]
    loc_q = sorted({wild_prompt(x.prompt, r.questions) for r in records for x in r.locality})
    print(f"{len(records)} records, {len(loc_q)} locality questions "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    before_edit, before_loc = (decode_answers(model, tok, q) for q in (edit_q, loc_q))
    editor = UltraEditor(model, tok, EditConfig.from_preset("smollm2-135m-lifelong",
                                                            matmul_dtype="bfloat16"))
    per_turn = -(-len(records) // args.turns)
    for t in range(args.turns):
        chunk = records[t * per_turn:(t + 1) * per_turn]
        editor.edit([q for r in chunk for q in edit_requests(r, args.edit_wordings)])
        print(f"turn {t + 1} done", file=sys.stderr)
    after_edit, after_loc = (decode_answers(model, tok, q) for q in (edit_q, loc_q))
    targets = sorted({normalize_answer(r.target) for r in records} - {""})
    loc = kinds(before_loc, after_loc, targets)
    own = kinds(before_edit, after_edit, targets)
    own["target_exact"] = sum(answer_exact(a, r.target) for a, r in zip(after_edit, records))
    examples = [{"question": q, "before": b, "after": a}
                for q, b, a in zip(loc_q, before_loc, after_loc) if b != a][:20]
    out = {"command": "experiments/empty_answers.py " + " ".join(argv or sys.argv[1:]),
           "edit_wordings": args.edit_wordings, "edits": len(records), "turns": args.turns,
           "locality_questions": loc, "edit_questions": own, "locality_examples": examples}
    print(json.dumps({k: out[k] for k in ("locality_questions", "edit_questions")}, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where locality erodes over lifelong turns: by turn, by relation, by key distance to the edited
subjects, and what the changed answers say.

The README's 1,000 offline records (or the first ``--edits``) are edited in turns of 100 with
the embedded model's preset. After every turn, every locality prompt of ALL the records (those
of records not edited yet too: what they lose is the crosstalk of the edits made so far) is
scored teacher-forced against the unedited model's predictions (the run's LS, per prompt). After
the last turn the WILD-style answers are decoded. Each locality prompt is an offline fact of
another subject, so its subject and relation are known; its distance to the edits is the
largest cosine between its subject's key and an edited subject's key (the unedited model's
``mlp.down_proj`` inputs of the preset's modules at the subject's last token, bare subject,
averaged over the modules).

Printed (and ``--json``): LS per turn for prompts whose record is edited / not yet edited;
final LS (teacher-forced and WILD-style) per relation and per quartile of the distance; of the
prompts whose unedited answer named the locality fact's answer, how many still name it (the
WILD-style LS asks the whole decoded text, up to a "." or newline, to stay the same); of the
WILD-style answers that changed, how many now name an edit's target, and the target of the
nearest edited subject.

    gunzip -c experiments/results/run_offline_records.jsonl.gz > records.jsonl
    PYTHONPATH=python python experiments/locality_erosion.py --records records.jsonl \\
        --json experiments/results/locality_erosion_1000.json
"""
import argparse
import json
import statistics
import time
from collections import defaultdict

import _common  # noqa: F401  (puts the repository on sys.path)
import torch

from ultraedit import UltraEditor
from ultraedit import preserve as pv
from ultraedit.data import OFFLINE_RELATIONS, load_records, offline_facts
from ultraedit.eval import (answer_contains, decode_answers, locality_reference, normalize_answer,
                            wild_prompt)
from ultraedit.eval.probing import _teacher_forced_ids, rows_per_batch
from ultraedit.models import load_model


def subject_of_prompt():
    """Every offline prompt (rewrite prompts and paraphrases) -> (subject, relation)."""
    table = {}
    for r in offline_facts(tuple(OFFLINE_RELATIONS)):
        for p in [r.prompt, *r.paraphrases]:
            table.setdefault(p, (r.subject, r.relation))
    return table


def bare_keys(model, tok, modules, subjects):
    """Unit-norm bare-subject keys per module (float64)."""
    got = pv.capture_subject_keys(model, tok, modules, subjects, ("{s}",))
    return {n: torch.nn.functional.normalize(got[n].keys.double(), dim=1) for n in modules}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", required=True, help="records JSONL (the README's 1,000)")
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--edits-per-turn", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.time()
    model, tok = load_model("default")
    records = load_records(a.records, "records", limit=a.edits)
    editor = UltraEditor(model, tok)
    where = subject_of_prompt()

    # every locality prompt once: (record index, prompt, answer, subject, relation)
    items, seen = [], set()
    for i, r in enumerate(records):
        for lp in r.locality:
            key = (lp.prompt, lp.answer)
            if key in seen:
                continue
            seen.add(key)
            subject, relation = where[lp.prompt]
            items.append({"record": i, "key": key, "subject": subject, "relation": relation,
                          "wild_prompt": wild_prompt(lp.prompt, r.questions)})
    print(f"{len(records)} records, {len(items)} distinct locality prompts", flush=True)
    ref = locality_reference(model, tok, records, wild=True)

    # key distance: the largest mean-over-modules cosine to an edited subject
    edited_subjects = list(dict.fromkeys(r.subject for r in records))
    loc_subjects = list(dict.fromkeys(it["subject"] for it in items))
    ek = bare_keys(model, tok, editor.modules, edited_subjects)
    lk = bare_keys(model, tok, editor.modules, loc_subjects)
    sim = sum(lk[n] @ ek[n].T for n in editor.modules) / len(editor.modules)
    best, nearest = sim.max(dim=1)
    loc_index = {s: j for j, s in enumerate(loc_subjects)}
    target_of = {}
    for r in records:
        target_of.setdefault(r.subject, r.target)
    for it in items:
        j = loc_index[it["subject"]]
        it["max_cos"] = float(best[j])
        it["nearest_subject"] = edited_subjects[int(nearest[j])]

    keys = [it["key"] for it in items]
    rows = rows_per_batch(None)
    turns = []
    n_turns = -(-len(records) // a.edits_per_turn)
    for t in range(n_turns):
        chunk = records[t * a.edits_per_turn:(t + 1) * a.edits_per_turn]
        rep = editor.edit([r.as_request() for r in chunk])
        preds = _teacher_forced_ids(model, tok, [(ref.prompt_ids[k], ref.gold[k]) for k in keys],
                                    rows)
        edited_upto = (t + 1) * a.edits_per_turn
        for it, k, p in zip(items, keys, preds):
            it.setdefault("ls_turns", []).append(
                sum(int(x == y) for x, y in zip(p, ref.predictions[k])) / len(p))
        done = [it["ls_turns"][-1] for it in items if it["record"] < edited_upto]
        todo = [it["ls_turns"][-1] for it in items if it["record"] >= edited_upto]
        row = {"turn": t + 1, "edits": min(edited_upto, len(records)), "turn_s": rep.turn_s,
               "ls_all": statistics.mean(it["ls_turns"][-1] for it in items),
               "ls_records_edited": statistics.mean(done) if done else None,
               "ls_records_not_yet_edited": statistics.mean(todo) if todo else None}
        turns.append(row)
        print(f"turn {row['turn']}: {rep.turn_s:.0f} s, LS all {row['ls_all']:.3f}, of edited "
              f"records {row['ls_records_edited']:.3f}, of records not yet edited "
              + ("-" if todo == [] else f"{row['ls_records_not_yet_edited']:.3f}"), flush=True)

    # the WILD-style answers after the last turn
    prompts = [it["wild_prompt"] for it in items]
    answers = decode_answers(model, tok, prompts)
    targets = list(dict.fromkeys(r.target for r in records))
    for it, p, ans in zip(items, prompts, answers):
        before = ref.answers[p]
        it["wild_same"] = normalize_answer(ans) == normalize_answer(before)
        it["answer_before"], it["answer_after"] = before, ans
        it["names_an_edit_target"] = (not it["wild_same"]) and any(
            answer_contains(ans, tg) for tg in targets) and not any(
            answer_contains(before, tg) for tg in targets)
        # the locality fact itself: its answer named before and after (WILD-style "contains")
        answer = it["key"][1]
        it["knew"] = answer is not None and answer_contains(before, answer)
        it["kept"] = it["knew"] and answer_contains(ans, answer)
        it["names_nearest_edit_target"] = (not it["wild_same"]) and answer_contains(
            ans, target_of[it["nearest_subject"]]) and not answer_contains(
            before, target_of[it["nearest_subject"]])

    def summary(group):
        return {"prompts": len(group),
                "ls": statistics.mean(it["ls_turns"][-1] for it in group),
                "wild_ls": statistics.mean(float(it["wild_same"]) for it in group),
                "changed_name_an_edit_target": sum(it["names_an_edit_target"] for it in group),
                "changed_name_the_nearest_edit_target": sum(it["names_nearest_edit_target"]
                                                            for it in group),
                "wild_changed": sum(not it["wild_same"] for it in group),
                "knew_the_answer": sum(it["knew"] for it in group),
                "still_name_it": sum(it["kept"] for it in group),
                "wild_ls_contains": (sum(it["kept"] for it in group)
                                     / max(1, sum(it["knew"] for it in group)))}

    by_relation = defaultdict(list)
    for it in items:
        by_relation[it["relation"]].append(it)
    order = sorted(items, key=lambda it: it["max_cos"])
    q = len(order) // 4
    quartiles = [order[:q], order[q:2 * q], order[2 * q:3 * q], order[3 * q:]]
    out = {"command": "experiments/locality_erosion.py", "records": len(records),
           "edits_per_turn": a.edits_per_turn, "modules": list(editor.modules),
           "turns": turns, "all": summary(items),
           "by_relation": {rel: summary(g) for rel, g in sorted(by_relation.items())},
           "by_distance_quartile": [
               {**summary(g), "max_cos_range": [g[0]["max_cos"], g[-1]["max_cos"]]}
               for g in quartiles],
           "examples": [{k: it[k] for k in ("key", "relation", "max_cos", "nearest_subject",
                                            "answer_before", "answer_after", "kept")}
                        for it in items if not it["wild_same"]][:40],
           "seconds": time.time() - t_start}
    head = ("| prompts | TF LS | WILD LS | still name the answer they named | WILD changed | "
            "... name an edit's target | ... the nearest edit's |")

    def line(s):
        return (f"| {s['prompts']} | {s['ls']:.3f} | {s['wild_ls']:.3f} | "
                f"{s['wild_ls_contains']:.3f} ({s['still_name_it']}/{s['knew_the_answer']}) | "
                f"{s['wild_changed']} | {s['changed_name_an_edit_target']} | "
                f"{s['changed_name_the_nearest_edit_target']} |")

    print("\n| relation " + head)
    for rel, s in out["by_relation"].items():
        print(f"| {rel} " + line(s))
    print("\n| max cos to an edited subject " + head)
    for s in out["by_distance_quartile"]:
        lo, hi = s["max_cos_range"]
        print(f"| {lo:.2f}-{hi:.2f} " + line(s))
    print("\n| all " + head + "\n| all " + line(out["all"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

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


def add_stream_args(ap, records="experiments/results/generalization_tuning.jsonl"):
    """``--records``, ``--turns``, ``--edits``, ``--json``: the prototype scripts' stream."""
    ap.add_argument("--records", default=records)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--edits", type=int, default=25)
    ap.add_argument("--json")


def load_stream(args):
    """``(model, tokenizer, records)``: the embedded model and the first ``turns x edits``
    records, one torch thread, seed 0, warnings off (what ``ultraedit run --threads 1`` does)."""
    import warnings

    import torch
    from ultraedit.data.formats import load_records
    from ultraedit.models import load_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    model, tok = load_model("default")
    return model, tok, load_records(args.records, format="records",
                                    limit=args.turns * args.edits)


def score_and_save(model, tokenizer, records, editor, args, post=None, **extra):
    """Run the lifelong stream with teacher-forced and WILD-style scores after the last turn
    (``ultraedit.eval.lifelong_run``), print one summary line, write ``--json``; returns the
    result with ``wall_s``, ``args`` and ``extra``. ``post``: a function of no argument called
    after the run (the edited model), whose dict joins the result and is printed."""
    import json
    import time

    from ultraedit.eval import lifelong_run

    t0 = time.perf_counter()
    res = lifelong_run(model, tokenizer, records, editor, args.turns, args.edits,
                       eval_end=True, wild=True, progress=False)
    res["wall_s"] = time.perf_counter() - t0
    res.update(extra)
    res["args"] = vars(args)
    more = post() if post is not None else {}
    res.update(more)
    tf, wild = res["final"]["teacher_forced"], res["final"]["wild"]
    turn_s = [round(t.get("report", t).get("turn_s"), 1) for t in res["turns"]]
    print(f"TF ES {tf['es']:.3f} GS {tf['gs']:.3f} LS {tf['ls']:.3f} | WILD ES {wild['es']:.3f} "
          f"GS {wild['gs']:.3f} LS {wild['ls']:.3f} contains ES {wild['es_contains']:.3f} "
          f"GS {wild['gs_contains']:.3f} | turns {turn_s}", flush=True)
    for key, value in more.items():
        print(f"{key}: {value}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
    return res


def other_prefix_paraphrases(record):
    """The record's paraphrases that hold its subject after other text than the rewrite prompt
    puts before it (the subject's key there is not the rewrite key)."""
    before = record.prompt[:record.prompt.find(record.subject)]
    return [p for p in record.paraphrases
            if p.find(record.subject) >= 0 and p[:p.find(record.subject)] != before]


def down_proj_keys(model, layers):
    """``(keys, remove)``: ``keys(ids)`` runs ``model`` on one sequence of token ids without
    autograd and returns the float64 inputs of ``model.model.layers[i].mlp.down_proj`` for ``i``
    in ``layers`` (L x T x d); ``remove()`` takes the hooks off again."""
    import torch

    store = {}
    handles = [model.model.layers[i].mlp.down_proj.register_forward_pre_hook(
        lambda mod, inp, i=i: store.__setitem__(i, inp[0][0].detach().double()))
        for i in layers]

    def keys(ids):
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        return torch.stack([store[i] for i in layers])

    def remove():
        for h in handles:
            h.remove()
    return keys, remove


def generic_token_keys(model, tokenizer, keys, new_tokens=48):
    """``keys`` (:func:`down_proj_keys`) of every token of the generic prompts
    (``ultraedit.preserve.GENERIC_PROMPTS``) followed by the model's own greedy continuation of
    ``new_tokens`` tokens, the tokenizer's special prefix left out: L x T x d."""
    import torch
    from ultraedit.eval.probing import greedy_continuations
    from ultraedit.preserve import GENERIC_PROMPTS
    from ultraedit.tokenization import encode_request, special_prefix

    prefix = special_prefix(tokenizer)
    prompt_ids = [encode_request(tokenizer, p, "x", prefix)[0] for p in GENERIC_PROMPTS]
    return torch.cat([keys(p + list(c))[:, len(prefix):] for p, c in
                      zip(prompt_ids, greedy_continuations(model, tokenizer, prompt_ids,
                                                           new_tokens))], 1)


def key_experiment(ap, layers, argv=None):
    """The start of a key-geometry experiment: ``ap`` gets ``--records`` (report records),
    ``--limit``, ``--layers`` (default ``layers``) and ``--json``; then one torch thread, the
    embedded model in eval mode and :func:`down_proj_keys` at those layers. Returns
    ``(args, model, tokenizer, layers, keys, remove_hooks)``."""
    import torch
    from ultraedit.models import load_model

    ap.add_argument("--records", default="experiments/results/generalization_report.jsonl")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--layers", default=layers)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = load_model("default")
    model.eval()
    layers = [int(x) for x in args.layers.split(",")]
    keys, remove_hooks = down_proj_keys(model, layers)
    return args, model, tok, layers, keys, remove_hooks


def save_result(path, out, script):
    """``out`` with the command that made it (``python experiments/<script> <args>``) as JSON
    at ``path`` (nothing without a path)."""
    import json

    out["command"] = f"python experiments/{script} " + " ".join(sys.argv[1:])
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def subject_record_keys(tokenizer, keys, records_path, limit):
    """The keys (:func:`down_proj_keys`) of the report records in ``records_path`` (the first
    ``limit`` whose prompt holds their subject) at the subject's last token:
    ``(records, subject_key, rewrite, paraphrase, owner)`` with ``subject_key(prompt, subject)``
    (L x d), ``rewrite`` (L x R x d: each record's prompt), ``paraphrase`` (L x P x d: its
    :func:`other_prefix_paraphrases`) and ``owner`` (P: the record of each paraphrase)."""
    import torch
    from ultraedit.data.formats import load_records
    from ultraedit.tokenization import encode_request, special_prefix, subject_token_index

    prefix = special_prefix(tokenizer)

    def subject_key(prompt, subject):
        ids = encode_request(tokenizer, prompt, "x", prefix)[0]
        return keys(ids)[:, subject_token_index(tokenizer, prompt, subject, prefix)]

    records = [r for r in load_records(records_path, format="records", limit=limit)
               if r.subject and r.subject in r.prompt]
    rewrite, pairs = [], []
    for r in records:
        rewrite.append(subject_key(r.prompt, r.subject))
        for p in other_prefix_paraphrases(r):
            pairs.append((len(rewrite) - 1, subject_key(p, r.subject)))
    return (records, subject_key, torch.stack(rewrite, 1),
            torch.stack([k for _, k in pairs], 1), torch.tensor([i for i, _ in pairs]))


def edit_reach(direction, keys, paraphrase_keys, owner):
    """How far rank-one edits reach: the edit ``v dᵀ`` made at the key ``k`` (rows of
    ``direction`` and ``keys``, R x d) moves the output at a key ``k'`` by
    ``r(k') = k'ᵀ d / kᵀ d`` of what it moves at ``k``. Returns ``(same, nearest, other)``: the
    mean ``r`` at each record's paraphrase keys (``paraphrase_keys``, P x d, of record
    ``owner``), and over records the largest and the mean ``|r|`` at the other records' keys."""
    import torch

    own = (direction * keys).sum(-1)
    same = (direction[owner] * paraphrase_keys).sum(-1) / own[owner]
    off = ~torch.eye(keys.shape[0], dtype=torch.bool)
    cross = ((direction @ keys.T) / own[:, None]).abs()
    return (float(same.mean()), float(cross.masked_fill(~off, -1).max(1).values.mean()),
            float(cross[off].mean()))


def rounds_parser(doc):
    """The options of the scripts that time one lifelong-preset turn of the README's records in
    alternating rounds (``bf16_turn_profile.py``, ``backward_overhead.py``,
    ``loss_overhead.py``)."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--records", required=True)
    p.add_argument("--edits", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    return p


def lifelong_turn(args, preset="smollm2-135m-lifelong", **overrides):
    """``(editor, requests)``: the embedded model with ``preset`` (and ``overrides``) and the
    first ``args.edits`` records of ``args.records`` as requests."""
    from ultraedit import EditConfig, UltraEditor
    from ultraedit.data import load_records
    from ultraedit.models import load_model

    model, tok = load_model("default")
    records = load_records(args.records, format="records", limit=args.edits)
    editor = UltraEditor(model, tok, EditConfig.from_preset(preset, **overrides))
    return editor, [r.as_request() for r in records]


def before_after_rounds(args, variants, preset="smollm2-135m-lifelong", **overrides):
    """Time one turn (:func:`lifelong_turn`: the lifelong preset unless ``preset``) under each
    of two code variants in alternating rounds: ``variants`` maps ``"before"`` and ``"after"``
    to context managers that patch the code in. Each round edits the same requests and rolls the turn back; the edited
    weights the variants leave are compared with ``torch.equal``. Returns the JSON-ready result
    (rounds, medians, ``speedup`` before/after, ``weights_bit_identical``)."""
    import statistics

    import torch

    torch.set_num_threads(args.threads)
    editor, requests = lifelong_turn(args, preset, **overrides)
    weights = {}

    def turn(name):
        with variants[name]():
            report = editor.edit(requests)
        if name not in weights:
            weights[name] = {n: m.weight.detach().clone() for n, m in editor.modules.items()}
        editor.rollback()
        return report

    for name in variants:   # warm-up (and the weights each variant leaves)
        turn(name)
    rounds = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            rep = turn(name)
            rounds[name].append({"turn_s": rep.turn_s, "fwd_bwd_s": rep.fwd_bwd_s,
                                 "steps_run": rep.steps_run})
            print(f"round {r} {name}: turn {rep.turn_s:.2f} s, forward+backward "
                  f"{rep.fwd_bwd_s:.2f} s", file=sys.stderr)
    equal = all(torch.equal(weights["before"][n], weights["after"][n]) for n in weights["after"])
    med = {v: {k: statistics.median(x[k] for x in rows) for k in ("turn_s", "fwd_bwd_s")}
           for v, rows in rounds.items()}
    return {"command": " ".join(sys.argv), "threads": args.threads, "edits": len(requests),
            "preset": preset, **{k: str(v) for k, v in overrides.items()}, "rounds": rounds,
            "median": med,
            "speedup": {k: med["before"][k] / med["after"][k] for k in ("turn_s", "fwd_bwd_s")},
            "weights_bit_identical": equal}


def report(out, path, keys=("median", "speedup", "weights_bit_identical")):
    """Print ``out``'s ``keys`` and write all of ``out`` to ``path`` as JSON (if given)."""
    import json

    print(json.dumps({k: out[k] for k in keys}, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def before_after_main(doc, before, argv=None) -> int:
    """The command of a script that times the previous code (``before``: a context manager
    that patches it in) against the package's in :func:`before_after_rounds`:
    :func:`rounds_parser`'s options and ``--matmul-dtype``; exit status 1 when the edited
    weights differ."""
    import contextlib

    p = rounds_parser(doc)
    p.add_argument("--matmul-dtype", default="model", choices=("model", "bfloat16"))
    args = p.parse_args(argv)
    out = before_after_rounds(args, {"before": before, "after": contextlib.nullcontext},
                              matmul_dtype=args.matmul_dtype)
    report(out, args.json)
    return 0 if out["weights_bit_identical"] else 1

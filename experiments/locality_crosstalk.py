"""Why locality erodes over lifelong turns: crosstalk between subject keys, measured.

One turn's least-squares update of a module with this turn's keys ``E`` (n x d), prior ``P``
(``λI``, plus ``μ K_pᵀK_p`` for preserved keys) and pseudo-values ``V`` (n x d_out)::

    ΔW = P⁻¹Eᵀ (E P⁻¹Eᵀ + I)⁻¹ V        (``ultraedit.solver``, Woodbury form)

moves the module's output on the edited keys by ``T V`` and on any other key ``k`` by ``S V``,
``T = E P⁻¹Eᵀ (E P⁻¹Eᵀ + I)⁻¹``, ``S = N P⁻¹Eᵀ (E P⁻¹Eᵀ + I)⁻¹`` (``N``: other subjects' keys,
one row each). With ``V`` of independent random rows, the expected output change of an unedited
subject relative to an edited one is the **crosstalk** ``(||S||_F / √m) / (||T||_F / √n)``.
Unedited subjects are the locality prompts' subjects of the offline records (cities of the
city -> country relation that the stream does not edit); keys are the unedited model's module
inputs at the subject's last token (the preset's capture position).

Printed (and ``--json``): per ``mlp.down_proj`` layer the mean |cos| between unedited and edited
keys and the crosstalk for n = 25 / 100 / 400 edits; at the preset's modules, the crosstalk with
each source of preserved keys.

    PYTHONPATH=python python experiments/locality_crosstalk.py --json experiments/results/locality_crosstalk.json
"""
import argparse
import gzip
import json
import os
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import torch

from ultraedit import preserve as pv
from ultraedit.models import load_model

RECORDS = os.path.join(os.path.dirname(__file__), "results", "run_offline_records.jsonl.gz")
PRESET_LAYERS = range(2, 7)


def stream_subjects(n_edits, n_neighbours):
    """The first ``n_edits`` distinct subjects of the 1,000 offline records (the stream's
    order) and up to ``n_neighbours`` city subjects of their locality prompts that the stream
    does not edit."""
    recs = [json.loads(line) for line in gzip.open(RECORDS, "rt")]
    edited = list(dict.fromkeys(r["subject"] for r in recs))
    neighbours = []
    for r in recs:
        for lp in r["locality"]:
            if " is a city in" in lp["prompt"]:
                neighbours.append(lp["prompt"].split(" is a city in")[0])
    neighbours = [s for s in dict.fromkeys(neighbours) if s not in set(edited)]
    return edited[:n_edits], neighbours[:n_neighbours]


def vocabulary_words(tokenizer, limit):
    """Capitalized whole-word tokens of the vocabulary (lowest ids, i.e. earliest merges, first),
    without function words and without any name of the offline tables: a generic list."""
    table = pv._table_words()
    out = []
    for tid in range(tokenizer.vocab_size):
        piece = tokenizer.convert_ids_to_tokens(tid)
        word = piece[1:] if piece.startswith("Ġ") else None
        if (word and len(word) >= 4 and word[0].isupper() and word[1:].isalpha()
                and word[1:].islower() and word.lower() not in pv._SPAN_STOP
                and not pv._holds_table_name(word, table)):
            out.append(word)
    return out[:limit]


def crosstalk(edited, others, prior_keys=None, mu=0.0, ridge=1.0):
    """``(||S||_F/√m) / (||T||_F/√n)`` (module docstring), float64."""
    d = edited.shape[1]
    p = ridge * torch.eye(d, dtype=torch.float64)
    if prior_keys is not None:
        p += mu * prior_keys.T @ prior_keys
    y = torch.linalg.solve(p, edited.T)
    inner = edited @ y
    a = torch.linalg.inv(inner + torch.eye(len(edited), dtype=torch.float64))
    s, t = others @ y @ a, inner @ a
    return float((s.norm() / others.shape[0] ** 0.5) / (t.norm() / edited.shape[0] ** 0.5))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", type=int, nargs="+", default=[25, 100, 400])
    ap.add_argument("--neighbours", type=int, default=300)
    ap.add_argument("--vocabulary", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_model("default")
    named = dict(model.named_modules())
    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(model.config.num_hidden_layers)]
    modules = {n: named[n] for n in layers}

    def keys(subjects, contexts=("{s}",), names=layers):
        got = pv.capture_subject_keys(model, tok, {n: modules[n] for n in names}, subjects,
                                      contexts)
        return {n: got[n].keys.double() for n in names}

    edited, neighbours = stream_subjects(max(args.edits), args.neighbours)
    e_keys, n_keys = keys(edited), keys(neighbours)
    result = {"edited_subjects": len(edited), "neighbours": len(neighbours), "layers": []}
    print(f"{len(edited)} edited subjects, {len(neighbours)} unedited neighbours")
    print("| layer | mean |cos| | " + " | ".join(f"crosstalk n={n}" for n in args.edits) + " |")
    for name in layers:
        e, o = e_keys[name], n_keys[name]
        cos = torch.nn.functional.normalize(o, dim=1) @ torch.nn.functional.normalize(e, dim=1).T
        row = {"module": name, "mean_abs_cos": float(cos.abs().mean()),
               "crosstalk": {str(n): crosstalk(e[:n], o) for n in args.edits}}
        result["layers"].append(row)
        print(f"| {name} | {row['mean_abs_cos']:.3f} | "
              + " | ".join(f"{row['crosstalk'][str(n)]:.3f}" for n in args.edits) + " |",
              flush=True)

    preset = [layers[i] for i in PRESET_LAYERS]
    n_turn = 100 if 100 in args.edits else args.edits[0]
    tables = pv.default_subjects()
    sources = {
        "none": None,
        ":generic (the default)": pv.mined_subjects(model, tok),
        f"vocabulary words ({args.vocabulary})": vocabulary_words(tok, args.vocabulary),
        ":tables without the measured neighbours": [s for s in tables if s not in set(neighbours)],
        ":tables (holds the measured neighbours)": tables,
    }
    result["preserved"] = []
    print(f"\nmodules {preset[0]} .. {preset[-1]}, n = {n_turn} edits, mean over modules")
    print("| preserved keys | subjects | μ = 0.3 | μ = 3 |")
    for label, subjects in sources.items():
        pk = None if subjects is None else keys(subjects, pv.DEFAULT_CONTEXTS, preset)
        row = {"source": label, "subjects": 0 if subjects is None else len(subjects)}
        for mu in (0.3, 3.0):
            vals = [crosstalk(e_keys[n][:n_turn], n_keys[n], None if pk is None else pk[n], mu)
                    for n in preset]
            row[f"mu={mu:g}"] = sum(vals) / len(vals)
        result["preserved"].append(row)
        print(f"| {label} | {row['subjects']} | {row['mu=0.3']:.3f} | {row['mu=3']:.3f} |",
              flush=True)
    result["seconds"] = time.time() - t0
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()

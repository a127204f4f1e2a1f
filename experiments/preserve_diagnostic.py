"""Where an edit turn still moves other subjects: the output change per prompt position.

On the demo-relations tuning facts (``experiments/editor_tuning.py --facts demo-relations``: capital /
language of 42 countries the demo never edits, 2 turns of 21) edit with the embedded default and
``preserve=μ``, then report ``Σ_modules ||ΔW k||`` with ``k`` the UNEDITED model's module inputs
at: the edited subjects' last tokens, the locality prompts' subject tokens, their other tokens
and their last token (the table in experiments/lifelong_runs.md).

    python experiments/preserve_diagnostic.py --preserve 0 0.3 3 \
        --modules 'model.layers.[4-8].mlp.down_proj'
    python experiments/preserve_diagnostic.py --preserve 0.3   # the default modules
"""
import argparse
import json
import os

import _common  # noqa: E402,F401  (puts the repository on sys.path)
import torch  # noqa: E402

from ultraedit import UltraEditor  # noqa: E402
from ultraedit.eval import demo_records  # noqa: E402
from ultraedit.data.offline import country_table  # noqa: E402
from ultraedit.data.records import EditRecord  # noqa: E402
from ultraedit.models import load_model  # noqa: E402
from ultraedit.tokenization import encode_request, subject_token_index  # noqa: E402


def tuning_facts(model, tok, cache):
    if cache and os.path.exists(cache):
        return [EditRecord.from_dict(d) for d in json.load(open(cache))]
    demo = demo_records(model, tok, 100, seed=0)
    records = demo_records(model, tok, 42, relations=("capital", "language"), seed=1,
                           exclude_subjects=[r.subject for r in demo])
    if cache:
        json.dump([r.to_dict() for r in records], open(cache, "w"))
    return records


def module_inputs(model, tok, modules, prompt):
    ids = encode_request(tok, prompt, "x")[0]
    box = {}
    hooks = [mod.register_forward_pre_hook(lambda m, a, n=n: box.__setitem__(n, a[0][0].detach()))
             for n, mod in modules.items()]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return ids, box


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preserve", type=float, nargs="+", default=[0.0, 0.3, 3.0])
    ap.add_argument("--facts-cache", default=None)
    ap.add_argument("--modules", nargs="*", default=None,
                    help="edited modules (names, globs, re: patterns); default: the editor's")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model()
    records = tuning_facts(model, tok, args.facts_cache)
    countries = sorted({r["name"] for r in country_table()}, key=len, reverse=True)
    for mu in args.preserve:
        editor = UltraEditor(model, tok, preserve=mu, modules=args.modules)
        mods = editor.modules
        w0 = {n: m.weight.detach().clone() for n, m in mods.items()}
        loc = [lp.prompt for r in records for lp in r.locality]
        loc_keys = [module_inputs(model, tok, mods, p) for p in loc]
        edit_keys = [module_inputs(model, tok, mods, r.prompt) for r in records]
        half = len(records) // 2
        editor.edit([r.as_request() for r in records[:half]])
        editor.edit([r.as_request() for r in records[half:2 * half]])
        dw = {n: m.weight.detach() - w0[n] for n, m in mods.items()}

        def change(box, j):
            return sum(float((box[n][j] @ dw[n].T).norm()) for n in mods)

        out = {"edited subjects": [], "locality subjects": [], "locality other tokens": [],
               "locality last token": []}
        for r, (ids, box) in zip(records[:2 * half], edit_keys):
            out["edited subjects"].append(change(box, subject_token_index(tok, r.prompt, r.subject)))
        for p, (ids, box) in zip(loc, loc_keys):
            subject = next(s for s in countries if s in p)
            si, last = subject_token_index(tok, p, subject), len(ids) - 1
            for j in range(len(ids)):
                key = ("locality subjects" if j == si else "locality last token" if j == last
                       else "locality other tokens")
                out[key].append(change(box, j))
        print(json.dumps({"preserve": mu, **{k: round(sum(v) / len(v), 2) for k, v in out.items()}}),
              flush=True)
        with torch.no_grad():  # back to the unedited weights for the next μ
            for n, m in mods.items():
                m.weight.copy_(w0[n])


if __name__ == "__main__":
    main()

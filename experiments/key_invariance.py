"""How much of a subject's key survives a change of its left context, layer by layer.

For each record, the input of ``mlp.down_proj`` (the key UltraEdit edits; ``--module``) at the subject's last
token in the rewrite prompt and in every paraphrase that puts other text before the subject,
from the unedited model. Per layer, after centering by the mean key of all these rows:
``same``: cosine between the subject's key in the rewrite prompt and in such a paraphrase;
``other``: cosine between the rewrite prompt's key and another record's subject key in that
record's rewrite prompt (other subjects, the locality side). An edit keyed at a layer reaches
the paraphrase when ``same`` is high, and leaves other subjects alone when ``other`` is low.

    PYTHONPATH=python python experiments/key_invariance.py --json experiments/results/key_invariance.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", default=os.path.join(ROOT, "experiments", "results",
                                                      "generalization_report.jsonl"))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--module", default="mlp.down_proj",
                    help="the edited Linear in each layer whose input is the key, e.g. mlp.up_proj")
    ap.add_argument("--fact-keys", type=int, default=0,
                    help="compare with the mean of the rewrite key and the subject's keys in the "
                         "first N generic contexts (key_contexts = N) instead of the rewrite key")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)

    from ultraedit.data.formats import load_records
    from ultraedit.models import load_model
    from ultraedit.tokenization import encode_request, special_prefix, subject_token_index
    from _common import other_prefix_paraphrases

    model, tok = load_model("default")
    model.eval()
    records = [r for r in load_records(a.records, format="records", limit=a.limit)
               if r.subject and r.subject in r.prompt]
    prefix = special_prefix(tok)
    layers = model.model.layers
    store = {}

    def hook(i):
        def fn(mod, inp):
            store[i] = inp[0].detach()
        return fn

    handles = [layers[i].get_submodule(a.module).register_forward_pre_hook(hook(i))
               for i in range(len(layers))]

    def keys_of(prompt, subject):
        ids = encode_request(tok, prompt, "x", prefix)[0]
        at = subject_token_index(tok, prompt, subject, prefix)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        return torch.stack([store[i][0, at] for i in range(len(layers))])   # L x d

    from ultraedit.fact_keys import KEY_CONTEXTS

    rewrite, pairs = [], []
    for r in records:
        k = keys_of(r.prompt, r.subject)
        for c in KEY_CONTEXTS[:a.fact_keys]:
            k = k + keys_of(c.format(s=r.subject), r.subject)
        k = k / (a.fact_keys + 1)
        rewrite.append(k)
        for p in other_prefix_paraphrases(r):
            pairs.append((len(rewrite) - 1, keys_of(p, r.subject)))
    for h in handles:
        h.remove()
    rw = torch.stack(rewrite)                     # R x L x d
    para = torch.stack([k for _, k in pairs])     # P x L x d
    owner = torch.tensor([i for i, _ in pairs])
    mean = torch.cat([rw, para]).mean(0)          # L x d
    unit = lambda x: torch.nn.functional.normalize(x - mean, dim=-1)   # noqa: E731
    rw_u, para_u = unit(rw), unit(para)
    same = (rw_u[owner] * para_u).sum(-1).mean(0)                # L
    cos = torch.einsum("ild,jld->lij", rw_u, rw_u)                # L x R x R
    off = ~torch.eye(len(rw), dtype=torch.bool)
    other = torch.stack([c[off].mean() for c in cos])
    other_max = torch.stack([c.masked_fill(~off, -2).max(1).values.mean() for c in cos])
    rows = [{"layer": i, "same": round(float(same[i]), 3), "other_mean": round(float(other[i]), 3),
             "other_nearest": round(float(other_max[i]), 3)} for i in range(len(layers))]
    print(f"{len(records)} records, {len(pairs)} paraphrases with other text before the subject")
    print("layer  same  other(mean)  other(nearest)")
    for row in rows:
        print(f"{row['layer']:5d}  {row['same']:.3f}  {row['other_mean']:.3f}  {row['other_nearest']:.3f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"module": a.module, "fact_keys": a.fact_keys, "records": a.records, "n_records": len(records), "n_pairs": len(pairs),
                       "layers": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

"""Two more edit directions against the key geometry: sparse keys and template neighbours.

A rank-one edit ``ΔW ∝ v dᵀ`` made at a subject's key ``k`` moves the output at another key
``k'`` by ``r(k') = k'ᵀ d / kᵀ d`` of what it moves at ``k`` (``key_metric.py``: ``d = M k``).
Per layer of the preset's ``down_proj`` 2-6, on the unedited model, this prints the mean ``r``
at the subject in a paraphrase with other text before it (``same``), the largest ``|r|`` at
another record's rewrite key (``nearest``) and the mean ``|r|`` over all other records
(``other``), for:

* ``top f``: ``d`` = ``k`` with all but its largest ``f`` fraction of coordinates (by magnitude)
  set to zero, and ``power p``: ``d = k |k|^p`` (an edit that reads only the subject's strongest
  features);
* ``template ρ``: ``d = (ρ C + I)⁻¹ k`` with ``C`` the second moment of the keys of the first
  ``--names`` mined generic names (``ultraedit.preserve.mined_subjects``) put in the rewrite
  prompt's own place of the subject (``own``: each record's template; ``pooled``: all records'
  templates): preserved keys of other subjects in the edit's own wording.

Keys are z-scored with the generic tokens' mean and std (``key_metric.py``); ``--raw`` also
prints the sparse rows on unnormalized keys. A direction helps when it keeps ``same`` while
lowering ``nearest`` and ``other``.

    PYTHONPATH=python python experiments/key_directions.py --json experiments/results/key_directions.json
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from _common import (down_proj_keys, edit_reach,  # (and the repository on sys.path)
                     generic_token_keys, other_prefix_paraphrases)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", default="experiments/results/generalization_report.jsonl")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--layers", default="2,3,4,5,6")
    ap.add_argument("--names", type=int, default=32)
    ap.add_argument("--raw", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)

    from ultraedit.data.formats import load_records
    from ultraedit.models import load_model
    from ultraedit.preserve import mined_subjects
    from ultraedit.tokenization import encode_request, special_prefix, subject_token_index

    model, tok = load_model("default")
    model.eval()
    layers = [int(x) for x in a.layers.split(",")]
    prefix = special_prefix(tok)
    keys, remove_hooks = down_proj_keys(model, layers)
    g = generic_token_keys(model, tok, keys)                      # L x T x d
    mean, std = g.mean(1), g.std(1).clamp_min(1e-6)             # L x d
    names = mined_subjects(model, tok)[:a.names]

    def subject_key(prompt, subject):
        ids = encode_request(tok, prompt, "x", prefix)[0]
        return keys(ids)[:, subject_token_index(tok, prompt, subject, prefix)]   # L x d

    records = [r for r in load_records(a.records, format="records", limit=a.limit)
               if r.subject and r.subject in r.prompt]
    rewrite, pairs, templates = [], [], []
    for r in records:
        rewrite.append(subject_key(r.prompt, r.subject))
        for p in other_prefix_paraphrases(r):
            pairs.append((len(rewrite) - 1, subject_key(p, r.subject)))
        at = r.prompt.find(r.subject)
        templates.append(torch.stack([subject_key(r.prompt[:at] + s + r.prompt[at + len(r.subject):], s)
                                      for s in names], 1))      # L x S x d
    remove_hooks()
    raw_k = torch.stack(rewrite, 1)                               # L x R x d
    raw_p = torch.stack([k for _, k in pairs], 1)                 # L x P x d
    owner = torch.tensor([i for i, _ in pairs])
    z = lambda x: (x - mean[:, None]) / std[:, None]              # noqa: E731
    zk, zp = z(raw_k), z(raw_p)
    zt = z(torch.stack(templates, 1).flatten(1, 2)).unflatten(1, (len(records), len(names)))
    eye = torch.eye(zk.shape[-1], dtype=torch.float64)
    out = {"records": len(records), "paraphrases": len(pairs), "names": names, "layers": layers,
           "columns": ["same", "nearest", "other"], "rows": {}}

    def row(name, direction, k, p):
        out["rows"][name] = [[round(x, 3) for x in edit_reach(direction(li, k[li]), k[li], p[li],
                                                              owner)]
                             for li in range(len(layers))]
        print(f"{name:22s}", " ".join(f"L{layer}:{s:.2f}/{n:.2f}/{o:.3f}" for layer, (s, n, o)
                                      in zip(layers, out["rows"][name])), flush=True)

    def top(frac):
        def direction(_li, k):
            idx = k.abs().topk(max(1, int(frac * k.shape[-1])), -1).indices
            return torch.zeros_like(k).scatter(-1, idx, k.gather(-1, idx))
        return direction

    for space, k, p in [("z", zk, zp)] + ([("raw", raw_k, raw_p)] if a.raw else []):
        row(f"{space} plain", lambda _li, k: k, k, p)
        for frac in (0.5, 0.25, 0.1, 0.05, 0.02):
            row(f"{space} top {frac}", top(frac), k, p)
        for power in (1, 2):
            row(f"{space} power {power}", lambda _li, k, power=power: k * k.abs() ** power, k, p)
    for rho in (0.1, 1.0, 10.0):
        def own(li, k, rho=rho):
            c = torch.einsum("rsd,rse->rde", zt[li], zt[li]) / zt.shape[2]
            return torch.linalg.solve(rho * c + eye, k.unsqueeze(-1)).squeeze(-1)

        def pooled(li, k, rho=rho):
            t = zt[li].flatten(0, 1)
            return torch.linalg.solve(rho * (t.T @ t) / t.shape[0] + eye, k.T).T
        row(f"template own {rho:g}", own, zk, zp)
        row(f"template pooled {rho:g}", pooled, zk, zp)
    out["command"] = "python experiments/key_directions.py " + " ".join(sys.argv[1:])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

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

import torch

from _common import (edit_reach, generic_token_keys,  # (and the repository on sys.path)
                     key_experiment, save_result, subject_record_keys)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--names", type=int, default=32)
    ap.add_argument("--raw", action="store_true")
    a, model, tok, layers, keys, remove_hooks = key_experiment(ap, "2,3,4,5,6", argv)
    from ultraedit.preserve import mined_subjects

    g = generic_token_keys(model, tok, keys)                      # L x T x d
    mean, std = g.mean(1), g.std(1).clamp_min(1e-6)             # L x d
    names = mined_subjects(model, tok)[:a.names]
    records, subject_key, raw_k, raw_p, owner = subject_record_keys(tok, keys, a.records,
                                                                    a.limit)
    templates = []                                                # the edit's wording, other names
    for r in records:
        at = r.prompt.find(r.subject)
        templates.append(torch.stack([subject_key(r.prompt[:at] + s + r.prompt[at + len(r.subject):], s)
                                      for s in names], 1))      # L x S x d
    remove_hooks()
    z = lambda x: (x - mean[:, None]) / std[:, None]              # noqa: E731
    zk, zp = z(raw_k), z(raw_p)
    zt = z(torch.stack(templates, 1).flatten(1, 2)).unflatten(1, (len(records), len(names)))
    eye = torch.eye(zk.shape[-1], dtype=torch.float64)
    out = {"records": len(records), "paraphrases": len(owner), "names": names, "layers": layers,
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
    save_result(a.json, out, "key_directions.py")


if __name__ == "__main__":
    main()

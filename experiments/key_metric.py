"""Would a covariance of generic-text keys separate a subject's contexts from other subjects?

A rank-one edit ``ΔW ∝ v (M k)ᵀ`` made at key ``k`` moves the output at another key ``k'`` by
``r(k') = k'ᵀ M k / kᵀ M k`` of what it moves at ``k``. UltraEdit's solve with preserved keys
``Kp`` has ``M = (μ KpᵀKp + λ I)⁻¹`` (ROME/MEMIT: ``M = C⁻¹``, ``C`` the keys' second moment
over generic text). For the unedited model, per layer, this prints the mean ``r`` at the
subject in a paraphrase with other text before it (``same``: the edit reaching the paraphrase)
and at the nearest other record's subject (``nearest``: the locality side), for ``M = I`` (the
plain dot product) and for ``M = (ρ C + I)⁻¹`` with ``C`` over every token of the model's own
greedy continuations of the generic prompts (``ultraedit.preserve.GENERIC_PROMPTS``: nothing
of the evaluated tables). Keys are z-scored with the generic tokens' mean and std, as the
editor z-scores them with its running statistics. A metric helps when it keeps ``same`` while
lowering ``nearest``.

    PYTHONPATH=python python experiments/key_metric.py --json experiments/results/key_metric.json
"""
from __future__ import annotations

import argparse

import torch

from _common import (edit_reach, generic_token_keys,  # (and the repository on sys.path)
                     key_experiment, save_result, subject_record_keys)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rho", default="0.1,1,10,100")
    ap.add_argument("--new-tokens", type=int, default=48)
    a, model, tok, layers, keys, remove_hooks = key_experiment(ap, "0,1,2,3,4,5,6,8,10", argv)
    rhos = [float(x) for x in a.rho.split(",")]

    # generic tokens: the prompts and the model's own continuations of them
    g = generic_token_keys(model, tok, keys, a.new_tokens)      # L x T x d
    mean, std = g.mean(1, keepdim=True), g.std(1, keepdim=True).clamp_min(1e-6)
    z = (g - mean) / std
    second = torch.einsum("ltd,lte->lde", z, z) / z.shape[1]     # L x d x d

    records, _, rewrite, paraphrase, owner = subject_record_keys(tok, keys, a.records, a.limit)
    remove_hooks()
    rw = (rewrite - mean) / std                                  # L x R x d, z-scored
    para = (paraphrase - mean) / std                             # L x P x d
    out = {"records": len(records), "paraphrases": len(owner), "generic_tokens": z.shape[1],
           "layers": layers, "metrics": {}}
    eye = torch.eye(rw.shape[-1], dtype=torch.float64)
    for name in ["identity"] + [f"rho={r:g}" for r in rhos]:
        rows = []
        for li in range(len(layers)):
            m = eye if name == "identity" else torch.linalg.inv(
                float(name[4:]) * second[li] + eye)
            same, nearest, other = edit_reach(rw[li] @ m, rw[li], para[li], owner)   # d = M k
            rows.append({"layer": layers[li], "same": round(same, 3),
                         "nearest": round(nearest, 3), "other_mean": round(other, 3)})
        out["metrics"][name] = rows
        print(name, " ".join(f"L{r['layer']}:{r['same']:.2f}/{r['nearest']:.2f}" for r in rows),
              flush=True)
    save_result(a.json, out, "key_metric.py")


if __name__ == "__main__":
    main()

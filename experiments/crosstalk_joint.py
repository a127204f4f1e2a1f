"""How much of the crosstalk between subject keys a solve over several modules removes.

``locality_crosstalk.py`` measures one module's least-squares update alone. An edit spread over
``L`` modules moves an unedited subject's residual stream by the sum of the modules' changes, so
what matters is the crosstalk of that sum. Three ways to spread it, with ``V`` of independent
random rows and keys of the unedited model at the subject's last token (each layer's keys scaled
to unit mean norm, as the editor's per-dimension normalization roughly does):

- ``per module``: the mean of each module's own crosstalk (``locality_crosstalk.py``);
- ``independent solves``: each module solves ``ΔW_l = V E_lᵀ(E_l E_lᵀ + λI)⁻¹ / L`` on its own
  keys (the editor today) and the output changes add: ``T = Σ_l T_l / L``, ``S = Σ_l S_l / L``;
- ``joint solve``: one least-squares update over the modules' keys concatenated
  (``[E_2, ..., E_6]``, ``d = L · 1536``, the same ``λ``): the minimum-norm update of all
  modules together.

Crosstalk = ``(||S||_F/√m) / (||T||_F/√n)`` as in ``locality_crosstalk.py``.

    PYTHONPATH=python python experiments/crosstalk_joint.py --json experiments/results/crosstalk_joint.json
"""
import argparse
import json
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import torch

from locality_crosstalk import stream_subjects
from ultraedit import preserve as pv
from ultraedit.models import load_model


def transfer(edited, others, ridge):
    """``(T, S)``: the output change on the edited and on the other keys per unit of ``V``."""
    inner = edited @ edited.T / ridge
    a = torch.linalg.inv(inner + torch.eye(len(edited), dtype=torch.float64))
    return inner @ a, (others @ edited.T / ridge) @ a


def ratio(t, s):
    return float((s.norm() / s.shape[0] ** 0.5) / (t.norm() / t.shape[0] ** 0.5))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", type=int, nargs="+", default=[100, 400, 897])
    ap.add_argument("--neighbours", type=int, default=300)
    ap.add_argument("--ridge", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_model("default")
    named = dict(model.named_modules())
    n_layers = model.config.num_hidden_layers
    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(n_layers)]
    edited, neighbours = stream_subjects(max(args.edits), args.neighbours)

    def keys(subjects):
        got = pv.capture_subject_keys(model, tok, {n: named[n] for n in layers}, subjects, ("{s}",))
        return {n: got[n].keys.double() for n in layers}

    e_keys, o_keys = keys(edited), keys(neighbours)
    for n in layers:  # one scale per layer, shared by edited and other keys
        scale = e_keys[n].norm(dim=1).mean() / e_keys[n].shape[1] ** 0.5
        e_keys[n], o_keys[n] = e_keys[n] / scale, o_keys[n] / scale
    sets = {"down_proj 2-6 (the preset)": range(2, 7), "down_proj 1-10": range(1, 11),
            "down_proj 0-29 (all)": range(n_layers)}
    result = {"edited_subjects": len(edited), "neighbours": len(neighbours),
              "ridge": args.ridge, "rows": []}
    print(f"{len(edited)} edited subjects, {len(neighbours)} unedited neighbours, ridge {args.ridge}")
    print("| modules | n | per module | independent solves | joint solve |")
    for label, idx in sets.items():
        names = [layers[i] for i in idx]
        for n in args.edits:
            if n > len(edited):
                continue
            per, t_sum, s_sum = [], 0, 0
            for name in names:
                t, s = transfer(e_keys[name][:n], o_keys[name], args.ridge)
                per.append(ratio(t, s))
                t_sum, s_sum = t_sum + t, s_sum + s
            cat_e = torch.cat([e_keys[m][:n] for m in names], 1)
            cat_o = torch.cat([o_keys[m] for m in names], 1)
            row = {"modules": label, "n": n, "per_module": sum(per) / len(per),
                   "independent": ratio(t_sum, s_sum),
                   "joint": ratio(*transfer(cat_e, cat_o, args.ridge))}
            result["rows"].append(row)
            print(f"| {label} | {n} | {row['per_module']:.3f} | {row['independent']:.3f} | "
                  f"{row['joint']:.3f} |", flush=True)
    result["seconds"] = time.time() - t0
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()

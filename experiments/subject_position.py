"""A subject that starts the prompt: how far its key is from the same subject elsewhere.

The embedded model's tokenizer puts no BOS token before a text, so in a rewrite prompt that
starts with the subject ("Ireland is located on the continent of") the subject's tokens see no
left context at all. For the report records whose prompt starts with the subject, per edited
layer (``mlp.down_proj`` inputs, layers 2-6, the unedited model), after centering by the mean of
every key collected: the cosine between the subject's key in the rewrite prompt (``bare``) or in
the rewrite prompt behind a short generic left context, and the same subject's key in the
record's question ("Q: On which continent is Ireland located?\\nA:") and in its first
paraphrase with other text before the subject; ``nearest other``: the largest cosine with
another record's subject key of the same kind (the locality side).

    PYTHONPATH=python python experiments/subject_position.py --json experiments/results/subject_position.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))

LAYERS = (2, 3, 4, 5, 6)
LEFT_CONTEXTS = ("Here is a fact. ", "Note: ", "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", default=os.path.join(ROOT, "experiments", "results",
                                                      "generalization_report.jsonl"))
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)

    from ultraedit.models import load_model

    model, tok = load_model("default")
    model.eval()
    store = {}

    def hook(i):
        def fn(mod, inp):
            store[i] = inp[0].detach()[0]
        return fn

    for i in LAYERS:
        model.model.layers[i].mlp.down_proj.register_forward_pre_hook(hook(i))

    def key(text, subject):
        """(layers, d) keys at the subject's last token of ``text``."""
        ids = tok(text, add_special_tokens=False)["input_ids"]
        end = text.index(subject) + len(subject)
        last = len(tok(text[:end], add_special_tokens=False)["input_ids"]) - 1
        with torch.no_grad():
            model(torch.tensor([ids]))
        return torch.stack([store[i][last] for i in LAYERS])

    records = [json.loads(line) for line in open(a.records)]
    records = [r for r in records if r["prompt"].startswith(r["subject"])
               and any(not p.startswith(r["subject"]) for p in r["paraphrases"])][:a.limit]
    kinds = {"bare": [], "question": [], "other_prefix": []}
    kinds.update({c: [] for c in LEFT_CONTEXTS})
    for r in records:
        s = r["subject"]
        kinds["bare"].append(key(r["prompt"], s))
        kinds["question"].append(key(f"Q: {r['questions'][r['prompt']]}\nA:", s))
        other = next(p for p in r["paraphrases"] if not p.startswith(s))
        kinds["other_prefix"].append(key(other, s))
        for c in LEFT_CONTEXTS:
            kinds[c].append(key(c + r["prompt"], s))
    mean = torch.stack([k for v in kinds.values() for k in v]).mean(0)

    def cos(x, y):
        return torch.nn.functional.cosine_similarity(x - mean, y - mean, dim=-1)

    def rounded(t):
        return [round(v, 3) for v in t.tolist()]

    rows = {}
    for name in ("bare",) + LEFT_CONTEXTS:
        src = kinds[name]
        n = len(src)
        nearest = torch.stack([
            torch.stack([cos(src[i], src[j]) for j in range(n)
                         if records[j]["subject"] != records[i]["subject"]]).max(0).values
            for i in range(n)]).mean(0)
        rows[name] = {
            "question": rounded(torch.stack([cos(src[i], kinds["question"][i]) for i in range(n)]).mean(0)),
            "other_prefix": rounded(torch.stack([cos(src[i], kinds["other_prefix"][i]) for i in range(n)]).mean(0)),
            "bare": rounded(torch.stack([cos(src[i], kinds["bare"][i]) for i in range(n)]).mean(0)),
            "nearest_other": rounded(nearest)}
        print(f"{name!r:20} {rows[name]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": "python experiments/subject_position.py " + " ".join(argv or sys.argv[1:]),
                       "records": len(records), "layers": LAYERS, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

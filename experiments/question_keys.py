"""Where an edit through a question is keyed, and how its keys crowd: crosstalk per position.

An edit keyed at one token moves the module's output at any other key in proportion to their
overlap (``locality_crosstalk.py``: one least-squares update with ridge 1 over the edited keys
``E``; the crosstalk is the mean output change at other keys ``N`` over the mean change at the
edited ones). This script compares the keys an edit can be keyed at, per ``mlp.down_proj``
layer of the embedded model, on the report split's offline facts:

* ``cloze @subject``: the rewrite prompt, the subject's last token (the presets' capture);
* ``question @subject``: the same fact asked as the WILD-style scores ask it
  (``"Q: <question>\\nA:"``), the subject's last token;
* ``question @answer``: the same question, its last token (``":"`` of ``"A:"``; the position
  ``positions="answer"`` captures at).

A locality prompt's subject is not stored; its cloze's last capitalized word stands for the
subject's last word (prompts whose question lacks that word are left out).

``E``: the first ``--edits`` records' rewrite prompts; ``N``: the locality prompts of all
``--records`` records (other subjects of the same relations, never edited), in the same
wording and at the same position. Printed (and ``--json``): mean |cos| between ``N`` and ``E``
and the crosstalk, per layer and key.

    PYTHONPATH=python python experiments/question_keys.py --threads 2 \\
        --json experiments/results/question_keys.json
"""
from __future__ import annotations

import argparse

import _common  # noqa: F401  (puts the repository on sys.path)
import torch
from locality_crosstalk import crosstalk

KINDS = ("cloze @subject", "question @subject", "question @answer")


def token_index(tokenizer, prompt: str, subject):
    """The index of the subject's last token in ``prompt`` (its last occurrence), or of the
    prompt's last token when ``subject`` is None."""
    enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
    if subject is None:
        return len(enc["input_ids"]) - 1
    end = prompt.rindex(subject) + len(subject)
    return max(i for i, (a, _) in enumerate(enc["offset_mapping"]) if a < end)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--layers", default="2,3,4,5,6,7,8,12,16,20,24,25,26,27,28")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from _common import down_proj_keys, save_result
    from ultraedit.data import REPORT_RELATIONS, offline_facts
    from ultraedit.eval import wild_prompt
    from ultraedit.models import load_model

    model, tok = load_model("default")
    layers = [int(x) for x in args.layers.split(",")]
    records = offline_facts(REPORT_RELATIONS, seed=0, limit=args.records, n_locality=3,
                            split="report")
    keys_of, remove = down_proj_keys(model, layers)

    def key(prompt, subject, questions, kind):
        text = prompt if kind.startswith("cloze") else wild_prompt(prompt, questions)
        if kind.startswith("question") and text == prompt:
            return None                     # no question for this prompt
        if subject is not None and subject not in text:
            return None                     # a locality question without its cloze's subject
        at = token_index(tok, text, None if kind.endswith("@answer") else subject)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return keys_of(ids)[:, at]          # L x d

    def subject_of(cloze):
        # a locality prompt's subject is not stored: its cloze's last capitalized word (not a
        # leading "The"), the last word of a subject such as "Ho Chi Minh City"
        words = [w.strip("?,.'s") for i, w in enumerate(cloze.split())
                 if w[:1].isupper() and not (i == 0 and w == "The")]
        return words[-1] if words else None

    out = {"records": len(records), "edits": args.edits, "layers": layers, "kinds": {}}
    try:
        for kind in KINDS:
            edited = [key(r.prompt, r.subject, r.questions, kind) for r in records[:args.edits]]
            others = [key(x.prompt, subject_of(x.prompt), r.questions, kind)
                      for r in records for x in r.locality]
            e = torch.stack([k for k in edited if k is not None], 1)    # L x n x d
            o = torch.stack([k for k in others if k is not None], 1)
            rows = []
            for li, layer in enumerate(layers):
                cos = (torch.nn.functional.normalize(o[li], dim=1)
                       @ torch.nn.functional.normalize(e[li], dim=1).T)
                rows.append({"layer": layer, "mean_abs_cos": float(cos.abs().mean()),
                             "crosstalk": crosstalk(e[li], o[li])})
            out["kinds"][kind] = {"edited": e.shape[1], "others": o.shape[1], "rows": rows}
    finally:
        remove()
    print("| layer | " + " | ".join(f"{k}: |cos|, crosstalk" for k in KINDS) + " |")
    for li, layer in enumerate(layers):
        cells = [out["kinds"][k]["rows"][li] for k in KINDS]
        print(f"| {layer} | " + " | ".join(f"{c['mean_abs_cos']:.3f}, {c['crosstalk']:.3f}"
                                           for c in cells) + " |")
    save_result(args.json, out, "experiments/question_keys.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

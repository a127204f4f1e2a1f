"""Extra key rows per edit: the subject's key in generic contexts, each given the edit's value.

``key_contexts`` (``ultraedit.fact_keys``) replaces an edit's key row by the MEAN of its subject's
keys over the rewrite prompt and generic contexts; the update then acts on one averaged
direction. Here each context's key is instead an EXTRA row of the step's system with the rewrite
prompt's output gradient as its value (the same fact asked from another wording of the subject's
left context), so the solve maps every captured key, not their mean, to the fact. The statistics,
the held edits and the key memory see the extra rows like any other. The preset otherwise;
2 turns of 25 on the shared tuning records of experiments/generalization.py; teacher-forced and
WILD-style scores over the original edits, and teacher-forced GS split by whether a
paraphrase has the rewrite prompt's text before the subject.

    PYTHONPATH=python python experiments/key_rows.py --contexts 1 --json experiments/results/paraphrase_tuning_keyrows1.json
    PYTHONPATH=python python experiments/key_rows.py --contexts 4 --mean --json key_rows_mean4.json
"""
from __future__ import annotations

import argparse

import torch

import _common


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, default=1,
                    help="the first N of ultraedit.fact_keys.KEY_CONTEXTS ('{s}' first)")
    ap.add_argument("--mean", action="store_true",
                    help="one extra row per edit: the mean of the rewrite key and the contexts' "
                         "keys (the fact key of key_contexts), instead of one row per context")
    _common.add_stream_args(ap)
    a = ap.parse_args(argv)
    model, tok, records = _common.load_stream(a)

    from augmented_prompts import gs_by_prefix
    from ultraedit import UltraEditor
    from ultraedit.fact_keys import KEY_CONTEXTS
    from ultraedit.preserve import capture_subject_keys
    from ultraedit.turn import EditRequest

    editor = UltraEditor(model, tok)
    contexts = KEY_CONTEXTS[:a.contexts]
    real_edit, real_capture = editor.edit, editor._capture
    turn_subjects = []

    def edit(requests):
        reqs = [EditRequest.coerce(r) for r in requests]
        turn_subjects[:] = [r.subject for r in reqs]
        return real_edit(reqs)

    def capture(batches, meter, first):
        parts, n_predicted, hold, first_out = real_capture(batches, meter, first)
        if not contexts:
            return parts, n_predicted, hold, first_out
        unique = list(dict.fromkeys(turn_subjects))
        where = {s: i for i, s in enumerate(unique)}
        captured = capture_subject_keys(editor.model, editor.tokenizer, editor.modules, unique,
                                        contexts)
        out = {}
        for name, chunks in parts.items():
            k = torch.cat([c[0] for c in chunks])
            g = torch.cat([c[1] for c in chunks])
            assert k.shape[0] == len(turn_subjects), "one key row per request (subject keys)"
            ctx = captured[name].keys.to(device=k.device, dtype=k.dtype)
            ctx = ctx.reshape(len(unique), len(contexts), -1)
            if a.mean:
                mine = ctx[[where[s] for s in turn_subjects]]           # N x C x d_in
                extra_k = (mine.sum(1) + k) / (len(contexts) + 1)
                extra_g = g
            else:
                extra_k = torch.cat([ctx[[where[s] for s in turn_subjects], j]
                                     for j in range(len(contexts))])
                extra_g = g.repeat(len(contexts), 1)
            out[name] = [(torch.cat([k, extra_k]), torch.cat([g, extra_g]))]
        if hold is not None:
            hold = hold.repeat(2 if a.mean else len(contexts) + 1)
        return out, n_predicted, hold, first_out

    editor.edit, editor._capture = edit, capture
    _common.score_and_save(model, tok, records, editor, a,
                           post=lambda: {"gs_by_prefix": gs_by_prefix(model, tok, records)},
                           contexts=list(contexts), mean=a.mean)


if __name__ == "__main__":
    main()

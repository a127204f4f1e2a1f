"""Fact keys: an edit's key as a property of its subject, not of one wording.

With ``positions="subject"`` an edit's key row in a module is the module's input at the last
token of the subject IN THE REWRITE PROMPT. A paraphrase ("Where is the capital of France?",
"France's capital city is") puts other tokens before the subject, so its key there differs,
and the update, which acts on the key's direction, reaches it only partly: efficacy high,
generalization low. ``EditConfig.key_contexts = n`` (n > 0) replaces each request's key row by
the mean of the subject's last-token key over the rewrite prompt and the first ``n`` generic
contexts of :data:`KEY_CONTEXTS` (ROME/MEMIT's averaged subject key), captured from the model
as it is at that step with :func:`ultraedit.preserve.capture_subject_keys`, at every edited
module. The output gradients stay those of the rewrite prompt (``G``, the direction the fact
must move), so only ``K`` (and what is built from it: the statistics, the solve, the key
memory of later turns) changes.

Cost per step: one forward over ``len(unique subjects) x n`` short texts, cut after the
deepest edited module (``ultraedit.preserve``); nothing when ``key_contexts = 0`` (the default,
bit-identical to before).

Equivalent PyTorch for one module and request ``i`` with subject ``s``::

    K[i] = (K_rewrite[i] + sum(key(model, c.format(s=s)) for c in KEY_CONTEXTS[:n])) / (n + 1)
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

__all__ = ["KEY_CONTEXTS", "MAX_KEY_CONTEXTS", "fact_keys"]

# Short generic left contexts, '{s}' the subject. The first two are the preserved subjects'
# contexts (ultraedit.preserve.DEFAULT_CONTEXTS), so averaged fact keys and preserved keys come
# from the same kind of text; the rest are neutral prefixes with no relation in them.
KEY_CONTEXTS = (
    "{s}",
    "I read a long article about {s}",
    "Here is what I know about {s}",
    "The following text is about {s}",
    "Yesterday we talked about {s}",
    "Tell me something about {s}",
    "This is a short note on {s}",
    "Many people have heard of {s}",
)
MAX_KEY_CONTEXTS = len(KEY_CONTEXTS)


def fact_keys(editor, reqs: Sequence, keys: Dict[str, torch.Tensor],
              n_contexts: int) -> Dict[str, torch.Tensor]:
    """``keys`` (``{module: N x d_in}``, row ``i`` = ``reqs[i]``'s subject key in its prompt)
    with every row replaced by the mean of itself and the subject's keys in the first
    ``n_contexts`` of :data:`KEY_CONTEXTS`, captured from ``editor.model`` now. New tensors
    of ``keys``' dtypes and devices; ``keys`` itself is not changed."""
    from .preserve import capture_subject_keys

    if n_contexts <= 0:
        return keys
    subjects = [r.subject for r in reqs]
    n = len(subjects)
    for name, k in keys.items():
        if k.shape[0] != n:
            raise RuntimeError(f"module {name!r}: {k.shape[0]} key rows for {n} requests; fact "
                               f"keys need one row per request (positions='subject')")
    unique: List[str] = list(dict.fromkeys(subjects))
    contexts = KEY_CONTEXTS[:n_contexts]
    captured = capture_subject_keys(editor.model, editor.tokenizer, editor.modules, unique,
                                    contexts)
    where = {s: i for i, s in enumerate(unique)}
    pick = torch.tensor([where[s] for s in subjects], dtype=torch.long)
    out = {}
    for name, k in keys.items():
        ctx = captured[name].keys.to(device=k.device, dtype=torch.float32)
        per_subject = ctx.reshape(len(unique), len(contexts), -1).sum(1)   # U x d_in
        total = per_subject[pick.to(k.device)] + k.to(torch.float32)
        out[name] = (total / (len(contexts) + 1)).to(k.dtype)
    return out

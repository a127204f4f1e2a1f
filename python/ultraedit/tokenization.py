"""Tokenization of edit requests into (input_ids, attention_mask, labels).

For one request with prompt tokens ``p_1..p_P`` (including the tokenizer's leading special
tokens, e.g. BOS) and target tokens ``a_1..a_T`` (the target with one leading space)::

    input_ids = [p_1, ..., p_P, a_1, ..., a_{T-1}]            length L = P + T - 1
    labels[t] = input_ids[t + 1]   for the answer positions t = P-1 .. P+T-2
                (i.e. labels[P-1+j] = a_{j+1}),   -100 elsewhere

so position ``t`` predicts token ``t + 1`` and the loss is
``cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)`` with NO further
shift. The *answer positions* are those with ``labels != -100``. Padding is on the right and
comes after the last real position ``L-1`` (itself the last answer position), so every padded
position has ``attention_mask == 0`` and ``labels == -100``: padding never is an answer position.

Target tokens are taken from tokenizing ``prompt + " " + target`` jointly when that
tokenization starts with the prompt's own tokens (so BPE merges at the boundary are the ones the
model sees when it generates), and from tokenizing ``" " + target`` alone otherwise.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["encode_edit_batch", "encode_request", "special_prefix"]

# Tokenizers without a real limit report model_max_length as a huge sentinel (int(1e30)).
_NO_LIMIT = 10**9


def _plain_ids(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer) -> List[int]:
    """The special tokens the tokenizer puts *before* a text (e.g. ``[bos]``, or ``[]``).

    Found by comparing the tokenization with and without special tokens, so it works for
    tokenizers that add BOS, that add nothing, and that add only a suffix (EOS), whose suffix we
    drop: an EOS between prompt and target would be wrong.
    """
    probe = "a"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = _plain_ids(tokenizer, probe)
    n = len(plain)
    for start in range(len(with_special) - n + 1):
        if with_special[start:start + n] == plain:
            return with_special[:start]
    return []


def _target_text(target: str) -> str:
    # Exactly one leading space: " Paris", whether the caller wrote "Paris" or " Paris".
    return " " + target.lstrip(" ")


def shown(text, limit: int = 80) -> str:
    """``repr(text)``, cut to about ``limit`` characters for error messages."""
    if isinstance(text, str) and len(text) > limit:
        return f"{text[:limit - 20]!r}... ({len(text):,} characters)"
    return repr(text)


def encode_request(tokenizer, prompt: str, target: str,
                   prefix: Optional[List[int]] = None) -> Tuple[List[int], List[int]]:
    """Return ``(prompt_ids, target_ids)`` for one request (prompt_ids include the special prefix).

    Raises ValueError for an empty prompt or target, or a target that tokenizes to nothing.
    """
    if not isinstance(prompt, str) or not isinstance(target, str):
        raise TypeError(f"prompt and target must be str, got {type(prompt).__name__} and "
                        f"{type(target).__name__}")
    if not prompt.strip():
        raise ValueError("empty prompt in edit request")
    if not target.strip():
        raise ValueError(f"empty target in edit request for prompt {shown(prompt)}")
    if prefix is None:
        prefix = special_prefix(tokenizer)
    p_plain = _plain_ids(tokenizer, prompt)
    if not p_plain:
        raise ValueError(f"prompt {shown(prompt)} tokenizes to no tokens")
    t_text = _target_text(target)
    joint = _plain_ids(tokenizer, prompt + t_text)
    if joint[:len(p_plain)] == p_plain and len(joint) > len(p_plain):
        t_ids = joint[len(p_plain):]
    else:
        # The boundary merged prompt and target tokens; tokenize the target on its own.
        t_ids = _plain_ids(tokenizer, t_text)
    if not t_ids:
        raise ValueError(f"target {shown(target)} tokenizes to no tokens")
    return list(prefix) + p_plain, t_ids


def subject_token_index(tokenizer, prompt: str, subject: str,
                        prefix: Optional[List[int]] = None) -> int:
    """Index, in ``encode_request``'s prompt ids, of the last token of ``subject`` in ``prompt``.

    The last occurrence of ``subject`` counts. Raises ValueError when the subject is empty or
    not in the prompt.
    """
    if not isinstance(subject, str):
        raise ValueError(f"the subject must be a string, got {type(subject).__name__} "
                         f"{shown(subject)} (prompt {shown(prompt)})")
    if not subject.strip():
        raise ValueError(f"empty subject for prompt {shown(prompt)}")
    start = prompt.rfind(subject)
    if start < 0:
        raise ValueError(f"subject {shown(subject)} does not occur in prompt {shown(prompt)}")
    if prefix is None:
        prefix = special_prefix(tokenizer)
    end = start + len(subject)
    p_plain = _plain_ids(tokenizer, prompt)
    head = _plain_ids(tokenizer, prompt[:end])
    if head and p_plain[:len(head)] == head:
        return len(prefix) + len(head) - 1
    # the subject's last token merged with what follows: the first token whose decoded prefix
    # covers the subject's end
    for j in range(1, len(p_plain) + 1):
        if len(tokenizer.decode(p_plain[:j])) >= end:
            return len(prefix) + j - 1
    return len(prefix) + len(p_plain) - 1


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0  # only ever under attention_mask == 0 and labels == -100, so its value is irrelevant


def _limit(tokenizer, max_length: Optional[int]) -> Optional[int]:
    if max_length is not None:
        return int(max_length)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is None or limit >= _NO_LIMIT:
        return None
    return int(limit)


def encode_edit_batch(tokenizer, prompts: Sequence[str], targets: Sequence[str], device=None,
                      max_length: Optional[int] = None,
                      encoded: Optional[Sequence[Tuple[List[int], List[int]]]] = None
                      ) -> Dict[str, torch.Tensor]:
    """Tokenize a batch of edit requests, right padded.

    Args:
        tokenizer: a Hugging Face tokenizer (slow or fast).
        prompts, targets: equal-length sequences of non-empty strings; each target gets one
            leading space.
        device: where the returned tensors go.
        max_length: the model's context length; a longer input raises ValueError. Defaults to the
            tokenizer's ``model_max_length`` when that is a real limit.
        encoded: the requests' ``encode_request`` ids when the caller has them already (they
            are not tokenized again).

    Returns:
        dict with ``input_ids`` (B, L) long, ``attention_mask`` (B, L) long, ``labels`` (B, L)
        long with ``labels[b, t] = input_ids[b, t+1]`` at answer positions and -100 elsewhere
        (including all padding), L = the longest ``len(prompt_ids) + len(target_ids) - 1``.
    """
    prompts, targets = list(prompts), list(targets)
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise ValueError("no edit requests to encode")
    limit = _limit(tokenizer, max_length)
    prefix = special_prefix(tokenizer)
    if encoded is not None and len(encoded) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(encoded)} encoded requests")
    rows = []
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        p_ids, t_ids = (encode_request(tokenizer, prompt, target, prefix) if encoded is None
                        else encoded[i])
        ids = p_ids + t_ids[:-1]
        if limit is not None and len(ids) > limit:
            raise ValueError(f"edit request {shown(prompt)} -> {shown(target)} is {len(ids)} tokens long, "
                             f"longer than the model's context of {limit} tokens")
        labels = [-100] * (len(p_ids) - 1) + t_ids
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, (ids, lab) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
        attention[b, :n] = 1
        labels[b, :n] = torch.tensor(lab, dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out

"""Fluency: the weighted 2-/3-gram entropy of ROME/MEMIT.

``mean(2/3 * H2, 4/3 * H3)`` with ``Hn = -sum p log2 p`` over the n-gram frequency distribution
of one greedy generation (words and punctuation as tokens), averaged over a few open prompts.
Repetitive text scores low.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

from ..tokenization import special_prefix
from .probing import Progress, _prompt_ids, greedy_continuations

__all__ = ["ngram_entropy", "fluency", "DEFAULT_FLUENCY_PROMPTS"]

DEFAULT_FLUENCY_PROMPTS = (
    "The history of the city of Paris",
    "My favourite food is",
    "Scientists have recently discovered that",
    "The main reasons people travel abroad are",
    "In the morning, the village",
)

_WORDS = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3),
                  weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME/MEMIT n-gram entropy of one text: ``mean_k(weights[k] * H_{ns[k]})`` with
    ``H_n = -sum_g p(g) log2 p(g)`` over the frequency distribution of the text's word n-grams
    (words and punctuation marks as tokens). 0.0 for a text too short to have n-grams."""
    tokens = _WORDS.findall(text)
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return sum(values) / len(values)


def fluency(model, tokenizer, prompts: Sequence[str] = DEFAULT_FLUENCY_PROMPTS,
            max_new_tokens: int = 40, batch_size: int = 32, progress: Progress = None) -> float:
    """Mean :func:`ngram_entropy` of the greedy continuations (``max_new_tokens`` tokens, the
    prompt excluded) of ``prompts``."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("fluency needs at least one prompt")
    prefix = special_prefix(tokenizer)
    gens = greedy_continuations(model, tokenizer, [_prompt_ids(tokenizer, p, prefix)
                                                   for p in prompts], max_new_tokens, batch_size,
                                progress)
    return sum(ngram_entropy(tokenizer.decode(g, skip_special_tokens=True))
               for g in gens) / len(prompts)

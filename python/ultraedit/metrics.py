"""The edit-quality metrics, kept importable under this name: they live in :mod:`ultraedit.eval`
(probing, locality, scores, fluency), where their definitions are documented."""

from .eval.fluency import DEFAULT_FLUENCY_PROMPTS, fluency, ngram_entropy
from .eval.locality import FREE_LOCALITY_TOKENS, LocalityReference, locality_reference
from .eval.probing import (generation_scores, greedy_continuations, next_token_predictions,
                           token_accuracy)
from .eval.scores import evaluate_records

__all__ = [
    "token_accuracy", "next_token_predictions", "greedy_continuations", "generation_scores",
    "ngram_entropy", "fluency", "locality_reference", "LocalityReference", "evaluate_records",
    "DEFAULT_FLUENCY_PROMPTS", "FREE_LOCALITY_TOKENS",
]

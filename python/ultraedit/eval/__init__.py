"""Evaluation of edits: probing, scores, locality, fluency, fact selection and the lifelong loop.

- :mod:`~ultraedit.eval.probing`: teacher-forced token accuracy, next-token predictions,
  greedy decoding and generation scores;
- :mod:`~ultraedit.eval.locality`: the unedited model's reference on locality prompts;
- :mod:`~ultraedit.eval.fluency`: ROME/MEMIT n-gram-entropy fluency;
- :mod:`~ultraedit.eval.wild`: WILD-style answers (a question, greedy decoding to a stop string)
  and their normalized judgement, and the wordings a record's edit requests are made in;
- :mod:`~ultraedit.eval.scores`: ES/GS/LS/PT (teacher-forced, generation, WILD-style) of records,
  and the unedited model's scores on their true answers;
- :mod:`~ultraedit.eval.facts`: keep the facts the unedited model knows;
- :mod:`~ultraedit.eval.loop`: the lifelong edit-and-evaluate loop of ``ultraedit demo``/``run``;
- :mod:`~ultraedit.eval.plot`: a PNG of a run's per-turn and final scores and times.
"""

from .facts import DEMO_RELATIONS, RUN_RELATIONS, demo_records, filter_known, offline_records
from .fluency import DEFAULT_FLUENCY_PROMPTS, fluency, ngram_entropy
from .locality import FREE_LOCALITY_TOKENS, LocalityReference, locality_reference
from .loop import lifelong_run
from .probing import (generation_scores, greedy_continuations, next_token_predictions,
                      token_accuracy)
from .scores import (check_record_lengths, evaluate_records, evaluation_work, true_fact_scores,
                     true_fact_work, wild_evaluation, wild_work)
from .wild import (MAX_NEW_TOKENS, QA_TEMPLATE, STOP_STRINGS, answer_contains, answer_exact,
                   EDIT_WORDINGS, asked_as_questions, decode_answers, decode_batch_size,
                   edit_requests, normalize_answer, scored_records, wild_prompt)

__all__ = [
    "token_accuracy", "next_token_predictions", "greedy_continuations", "generation_scores",
    "ngram_entropy", "fluency", "DEFAULT_FLUENCY_PROMPTS", "locality_reference",
    "LocalityReference", "FREE_LOCALITY_TOKENS", "evaluate_records", "evaluation_work", "filter_known", "demo_records",
    "offline_records", "DEMO_RELATIONS", "RUN_RELATIONS", "lifelong_run", "plot_run",
    "wild_evaluation", "wild_work", "check_record_lengths", "true_fact_scores", "true_fact_work", "decode_answers",
    "decode_batch_size", "normalize_answer", "answer_exact",
    "answer_contains", "wild_prompt", "edit_requests", "EDIT_WORDINGS",
    "asked_as_questions", "scored_records", "QA_TEMPLATE",
    "STOP_STRINGS", "MAX_NEW_TOKENS",
]


def __getattr__(name):
    if name == "plot_run":   # matplotlib loads only when a plot is drawn
        from .plot import plot_run

        return plot_run
    raise AttributeError(f"module 'ultraedit.eval' has no attribute {name!r}")

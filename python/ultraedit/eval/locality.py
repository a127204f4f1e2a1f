"""Locality against the unedited model.

:func:`locality_reference` captures, before the first edit, the unedited model's behaviour on
every locality prompt of the records: per prompt the teacher-forcing prefix (the data set's
answer, or the unedited model's own greedy continuation of :data:`FREE_LOCALITY_TOKENS` tokens
when the data set gives no answer), the unedited argmax at those positions and, for generation
scores, the unedited greedy continuation and, for the WILD-style scores, the unedited answer
decoded to a stop string (:mod:`ultraedit.eval.wild`). :func:`ultraedit.eval.evaluate_records`
compares the edited model with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..data.records import EditRecord
from ..tokenization import encode_request, special_prefix
from .probing import (Progress, _prompt_ids, _teacher_forced_ids, greedy_continuations,
                      rows_per_batch)
from .wild import decode_answers, wild_prompt

__all__ = ["LocalityReference", "locality_reference", "locality_work", "FREE_LOCALITY_TOKENS"]

# Tokens a locality prompt without an answer is judged on (the unedited greedy continuation).
FREE_LOCALITY_TOKENS = 3


@dataclass
class LocalityReference:
    """The unedited model's behaviour on locality prompts, keyed by ``(prompt, answer)``.

    ``gold[key]``: the token ids used as teacher-forcing prefix (the answer's tokens, or the
    unedited greedy continuation when ``answer`` is None); ``predictions[key]``: the unedited
    argmax at those positions; ``generations[key]``: the unedited greedy continuation of the
    same length (only when captured with ``generation=True``); ``prompt_ids[key]``;
    ``answers[wild_prompt]``: the unedited answer decoded to a stop string, keyed by the prompt
    the WILD-style scores ask (only when captured with ``wild=True``).
    """

    prompt_ids: Dict[Tuple[str, Optional[str]], List[int]] = field(default_factory=dict)
    gold: Dict[Tuple[str, Optional[str]], List[int]] = field(default_factory=dict)
    predictions: Dict[Tuple[str, Optional[str]], List[int]] = field(default_factory=dict)
    generations: Dict[Tuple[str, Optional[str]], List[int]] = field(default_factory=dict)
    answers: Dict[str, str] = field(default_factory=dict)

    def __contains__(self, key) -> bool:
        return key in self.predictions

    def __len__(self) -> int:
        return len(self.predictions)


def _locality_keys(records: Iterable[EditRecord]) -> List[Tuple[str, Optional[str]]]:
    seen, keys = set(), []
    for r in records:
        for lp in r.locality:
            key = (lp.prompt, lp.answer)
            if key not in seen:
                seen.add(key)
                keys.append(key)
    return keys


def _wild_locality_prompts(records: Iterable[EditRecord]) -> List[str]:
    """The prompts the WILD-style locality score asks, once each, in order."""
    return list(dict.fromkeys(wild_prompt(lp.prompt, r.questions)
                              for r in records for lp in r.locality))


def _missing(records, ref: LocalityReference, generation: bool):
    return [k for k in _locality_keys(records)
            if k not in ref or (generation and k not in ref.generations)]


def locality_work(records: Sequence[EditRecord], generation: bool = False,
                  reference: Optional[LocalityReference] = None, wild: bool = False) -> int:
    """How many prompts :func:`locality_reference` will run (its ``progress`` counts to this)."""
    ref = reference if reference is not None else LocalityReference()
    keys = _missing(records, ref, generation)
    n = len(keys) + (generation * sum(k[1] is not None for k in keys))
    if wild:
        n += sum(p not in ref.answers for p in _wild_locality_prompts(records))
    return n


def locality_reference(model, tokenizer, records: Sequence[EditRecord], generation: bool = False,
                       batch_size: Optional[int] = None,
                       reference: Optional[LocalityReference] = None,
                       progress: Progress = None, wild: bool = False) -> LocalityReference:
    """Capture the UNEDITED model's predictions on every locality prompt of ``records`` (call it
    before editing; pass the result to :func:`evaluate_records` after). With ``reference`` given,
    only prompts it lacks are computed and it is extended in place (lifelong runs). ``wild``
    also decodes the unedited answers the WILD-style locality score compares with.
    ``batch_size`` as :func:`~ultraedit.eval.evaluate_records`'."""
    ref = reference if reference is not None else LocalityReference()
    rows = rows_per_batch(batch_size)
    if wild:
        todo = [p for p in _wild_locality_prompts(records) if p not in ref.answers]
        if todo:
            for p, a in zip(todo, decode_answers(model, tokenizer, todo, batch_size=batch_size,
                                                 progress=progress)):
                ref.answers[p] = a
    keys = _missing(records, ref, generation)
    if not keys:
        return ref
    prefix = special_prefix(tokenizer)
    answered = [k for k in keys if k[1] is not None]
    free = [k for k in keys if k[1] is None]
    for k in answered:
        ref.prompt_ids[k], ref.gold[k] = encode_request(tokenizer, k[0], k[1], prefix)
    if free:
        for k in free:
            ref.prompt_ids[k] = _prompt_ids(tokenizer, k[0], prefix)
        gens = greedy_continuations(model, tokenizer, [ref.prompt_ids[k] for k in free],
                                    FREE_LOCALITY_TOKENS, rows, progress)
        for k, g in zip(free, gens):
            ref.gold[k] = g
            ref.predictions[k] = list(g)   # greedy = argmax given its own prefix
            ref.generations[k] = list(g)
    if answered:
        preds = _teacher_forced_ids(model, tokenizer,
                                    [(ref.prompt_ids[k], ref.gold[k]) for k in answered],
                                    rows, progress)
        for k, p in zip(answered, preds):
            ref.predictions[k] = p
        if generation:
            gens = greedy_continuations(model, tokenizer, [ref.prompt_ids[k] for k in answered],
                                        [len(ref.gold[k]) for k in answered], rows,
                                        progress)
            for k, g in zip(answered, gens):
                ref.generations[k] = g
    return ref

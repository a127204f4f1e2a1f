"""Edit-quality scores of a set of records on the model as it is now.

Definitions (all scores in 0..1, except fluency in bits):

- **ES** (efficacy) = mean over records of the teacher-forced token accuracy
  (:func:`ultraedit.eval.token_accuracy`) of ``(prompt, target)``; **GS** (generalization) =
  mean over records with paraphrases of the mean accuracy over its paraphrases; **PT**
  (portability) likewise over ``(prompt, answer)`` portability pairs.
- **LS** (locality) with a :class:`~ultraedit.eval.LocalityReference` captured from the UNEDITED
  model: per locality prompt, the fraction of positions where the edited model's teacher-forced
  argmax equals the unedited model's argmax (gold prefix = the data set's answer, or the unedited
  model's own greedy continuation when the data set gives no answer); averaged per record, then
  over records. ``ls_data`` is the teacher-forced accuracy on the data set's locality answers
  (where given). Without a reference, ``ls`` is ``ls_data`` and ``ls_source`` says so.
- **Generation** (no teacher forcing): greedy decoding of ``len(target tokens)`` new tokens after
  the prompt, exact and prefix match (:func:`ultraedit.eval.generation_scores`); ``gen_ls``
  compares with the unedited model's greedy continuation stored in the reference.
- **Fluency**: :func:`ultraedit.eval.fluency` on a few open prompts.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from ..data.records import EditRecord
from .fluency import DEFAULT_FLUENCY_PROMPTS, fluency
from .locality import LocalityReference, _locality_keys
from .probing import (Progress, _prefix_fraction, _teacher_forced_ids, generation_scores,
                      greedy_continuations, token_accuracy)

__all__ = ["evaluate_records", "evaluation_work"]


def _mean(values: List[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _per_record(records, pairs_of, scores: Dict) -> Optional[float]:
    """Mean over records (that have items) of the mean score over the record's items."""
    per = []
    for r in records:
        items = pairs_of(r)
        if items:
            per.append(sum(scores[x] for x in items) / len(items))
    return _mean(per)


def _without_portability(records: Sequence[EditRecord]) -> List[EditRecord]:
    return [EditRecord(prompt=r.prompt, target=r.target, paraphrases=r.paraphrases,
                       locality=r.locality, subject=r.subject, relation=r.relation,
                       target_true=r.target_true, extra=r.extra) for r in records]


def _teacher_forced_pairs(records) -> List[Tuple[str, str]]:
    """Every unique (prompt, target) string pair scored teacher-forced, in one pass."""
    pairs = []
    for r in records:
        pairs.append((r.prompt, r.target))
        pairs += [(p, r.target) for p in r.paraphrases]
        pairs += [(lp.prompt, lp.answer) for lp in r.locality if lp.answer is not None]
        pairs += list(r.portability)
    return list(dict.fromkeys(pairs))


def _generation_pairs(records, ref) -> List[Tuple[str, str]]:
    gpairs = []
    for r in records:
        gpairs.append((r.prompt, r.target))
        gpairs += [(p, r.target) for p in r.paraphrases]
        gpairs += list(r.portability)
        if ref is None:
            gpairs += [(lp.prompt, lp.answer) for lp in r.locality if lp.answer]
    return list(dict.fromkeys(gpairs))


def evaluation_work(records: Sequence[EditRecord],
                    locality_reference: Optional[LocalityReference] = None,
                    generation: bool = False, fluency_prompts: Optional[Sequence[str]] = None,
                    portability: bool = True) -> int:
    """How many prompts :func:`evaluate_records` runs with these arguments (its ``progress``
    counts to this number)."""
    records = list(records) if portability else _without_portability(records)
    if not records:
        return 0
    keys = _locality_keys(records) if locality_reference is not None else []
    n = len(_teacher_forced_pairs(records)) + len(keys)
    if generation:
        n += len(_generation_pairs(records, locality_reference)) + len(keys)
        n += len(DEFAULT_FLUENCY_PROMPTS if fluency_prompts is None else fluency_prompts)
    return n


def evaluate_records(model, tokenizer, records: Sequence[EditRecord],
                     locality_reference: Optional[LocalityReference] = None,
                     generation: bool = False, batch_size: int = 32,
                     fluency_prompts: Optional[Sequence[str]] = None,
                     portability: bool = True, progress: Progress = None) -> Dict[str, object]:
    """Score ``records`` on the model as it is now (see the module docstring for definitions).

    Returns a dict with ``n`` (records), ``es``, ``gs``, ``ls``, ``ls_data``, ``pt`` (None where
    the records have no such prompts), ``ls_source`` (``"unedited"`` when ``ls`` is measured
    against ``locality_reference``, ``"answers"`` when against the data set's answers, None) and,
    with ``generation=True``, ``gen_es``, ``gen_gs``, ``gen_ls``, ``gen_pt`` (exact match),
    ``gen_es_prefix``, ``gen_gs_prefix``, ``gen_ls_prefix``, ``gen_pt_prefix`` (prefix match) and
    ``fluency`` (on ``fluency_prompts``, default :data:`DEFAULT_FLUENCY_PROMPTS`).
    A locality prompt missing from ``locality_reference`` raises KeyError. ``portability=False``
    skips the portability prompts (``pt`` keys are then None), which saves their forward passes.
    ``progress`` is called with the number of prompts of each finished batch
    (:func:`evaluation_work` is the total).
    """
    records = list(records) if portability else _without_portability(records)
    out: Dict[str, object] = {"n": len(records)}
    if not records:
        for k in ("es", "gs", "ls", "ls_data", "pt", "ls_source"):
            out[k] = None
        return out
    ref = locality_reference
    pairs = _teacher_forced_pairs(records)
    acc = dict(zip(pairs, token_accuracy(model, tokenizer, [p for p, _ in pairs],
                                         [t for _, t in pairs], batch_size, progress)))
    out["es"] = _mean([acc[(r.prompt, r.target)] for r in records])
    out["gs"] = _per_record(records, lambda r: [(p, r.target) for p in r.paraphrases], acc)
    out["pt"] = _per_record(records, lambda r: list(r.portability), acc)
    out["ls_data"] = _per_record(
        records, lambda r: [(lp.prompt, lp.answer) for lp in r.locality if lp.answer], acc)
    keys = _locality_keys(records)
    if ref is not None and keys:
        missing = [k for k in keys if k not in ref]
        if missing:
            raise KeyError(f"{len(missing)} locality prompts are not in the reference, e.g. "
                           f"{missing[0]!r}; capture it with locality_reference() before editing")
        preds = _teacher_forced_ids(model, tokenizer,
                                    [(ref.prompt_ids[k], ref.gold[k]) for k in keys], batch_size,
                                    progress)
        same = {k: sum(int(a == b) for a, b in zip(p, ref.predictions[k])) / len(p)
                for k, p in zip(keys, preds)}
        out["ls"] = _per_record(records, lambda r: [(lp.prompt, lp.answer) for lp in r.locality],
                                same)
        out["ls_source"] = "unedited"
    else:
        out["ls"] = out["ls_data"]
        out["ls_source"] = "answers" if out["ls_data"] is not None else None
    if generation:
        gpairs = _generation_pairs(records, ref)
        gen = dict(zip(gpairs, generation_scores(model, tokenizer, [p for p, _ in gpairs],
                                                 [t for _, t in gpairs], batch_size, progress)))
        exact = {k: v[0] for k, v in gen.items()}
        pref = {k: v[1] for k, v in gen.items()}
        for name, scores in (("", exact), ("_prefix", pref)):
            out["gen_es" + name] = _mean([scores[(r.prompt, r.target)] for r in records])
            out["gen_gs" + name] = _per_record(
                records, lambda r: [(p, r.target) for p in r.paraphrases], scores)
            out["gen_pt" + name] = _per_record(records, lambda r: list(r.portability), scores)
        if ref is not None and keys:
            missing = [k for k in keys if k not in ref.generations]
            if missing:
                raise KeyError(f"{len(missing)} locality prompts have no reference generation; "
                               "capture the reference with generation=True")
            gens = greedy_continuations(model, tokenizer, [ref.prompt_ids[k] for k in keys],
                                        [len(ref.generations[k]) for k in keys], batch_size,
                                        progress)
            lex = {k: float(g == ref.generations[k]) for k, g in zip(keys, gens)}
            lpre = {k: _prefix_fraction(g, ref.generations[k]) for k, g in zip(keys, gens)}
        else:
            lex = exact
            lpre = pref
        loc = lambda r: [(lp.prompt, lp.answer) for lp in r.locality  # noqa: E731
                         if ref is not None or lp.answer]
        out["gen_ls"] = _per_record(records, loc, lex)
        out["gen_ls_prefix"] = _per_record(records, loc, lpre)
        out["fluency"] = fluency(model, tokenizer,
                                 DEFAULT_FLUENCY_PROMPTS if fluency_prompts is None
                                 else fluency_prompts, batch_size=batch_size, progress=progress)
    return out

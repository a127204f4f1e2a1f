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
- **WILD-style** (:mod:`ultraedit.eval.wild`): the record's question in a QA format where its
  source has one (else the prompt as it is), greedy decoding to a stop string (``"."``, a
  newline, EOS; at most 50 tokens), then ``wild_es``/``wild_gs``/``wild_pt`` = normalized exact
  match and ``wild_*_contains`` = the answer contains the target; ``wild_ls`` = the decoded
  answer to a locality prompt is, normalized, the unedited model's (from the reference);
  ``wild_ls_contains`` = of the locality prompts whose unedited answer contains the data set's
  answer, the share whose answer still does (the whole decoded text, up to a stop string, may
  change after the answer and still keep the fact).
- **Fluency**: :func:`ultraedit.eval.fluency` on a few open prompts.
- **True facts** (:func:`true_fact_scores`, run on the UNEDITED model): ES and GS (teacher-forced,
  and WILD-style on request) against each record's TRUE answer (``target_true``). The offline
  facts are chosen so that the unedited model completes every rewrite prompt with its true
  answer (ES 1), but it answers their paraphrases and questions less often: what it does for
  the knowledge it already has is the yardstick an edit's GS is read against. ``gs_known``
  (:func:`evaluate_records` with ``known_paraphrases``) is an edit's GS over only the
  paraphrases through which the unedited model completed the true answer.
"""

from __future__ import annotations

import dataclasses
from typing import Collection, Dict, List, Optional, Sequence, Tuple

from ..data.records import EditRecord
from .fluency import DEFAULT_FLUENCY_PROMPTS, fluency
from .locality import LocalityReference, _locality_keys
from .probing import (Progress, _prefix_fraction, _teacher_forced_ids, generation_scores,
                      greedy_continuations, token_accuracy, rows_per_batch)
from .wild import answer_contains, answer_exact, decode_answers, wild_judgements, wild_prompt

__all__ = ["evaluate_records", "evaluation_work", "wild_evaluation", "wild_work",
           "true_fact_scores", "true_fact_work", "check_record_lengths"]


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
    return [dataclasses.replace(r, portability=[]) for r in records]


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


def _wild_pairs(records) -> List[Tuple[str, str]]:
    """Every unique (WILD prompt, target) pair of the records' edits and portability prompts."""
    pairs = []
    for r in records:
        q = r.questions
        pairs.append((wild_prompt(r.prompt, q), r.target))
        pairs += [(wild_prompt(p, q), r.target) for p in r.paraphrases]
        pairs += [(wild_prompt(p, q), a) for p, a in r.portability]
    return list(dict.fromkeys(pairs))


def _wild_locality_items(records, ref) -> List[Tuple[str, Optional[str]]]:
    """(WILD prompt, data set answer) of the locality prompts the WILD locality score asks:
    all of them against the reference, else those with an answer."""
    return [(wild_prompt(lp.prompt, r.questions), lp.answer) for r in records
            for lp in r.locality if ref is not None or lp.answer]


def _wild_prompts(records, ref) -> List[str]:
    """The prompts the WILD-style scores decode, once each."""
    prompts = [p for p, _ in _wild_pairs(records)]
    prompts += [p for p, _ in _wild_locality_items(records, ref)]
    return list(dict.fromkeys(prompts))


def evaluation_work(records: Sequence[EditRecord],
                    locality_reference: Optional[LocalityReference] = None,
                    generation: bool = False, fluency_prompts: Optional[Sequence[str]] = None,
                    portability: bool = True, wild: bool = False) -> int:
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
    if wild:
        n += wild_work(records, locality_reference)
    return n


def wild_work(records: Sequence[EditRecord],
              locality_reference: Optional[LocalityReference] = None) -> int:
    """How many prompts :func:`wild_evaluation` decodes (its ``progress`` counts to this)."""
    return len(_wild_prompts(list(records), locality_reference))


def evaluate_records(model, tokenizer, records: Sequence[EditRecord],
                     locality_reference: Optional[LocalityReference] = None,
                     generation: bool = False, batch_size: Optional[int] = None,
                     fluency_prompts: Optional[Sequence[str]] = None,
                     portability: bool = True, progress: Progress = None,
                     wild: bool = False,
                     known_paraphrases: Optional[Collection[Sequence[str]]] = None
                     ) -> Dict[str, object]:
    """Score ``records`` on the model as it is now (see the module docstring for definitions).

    Returns a dict with ``n`` (records), ``es``, ``gs``, ``ls``, ``ls_data``, ``pt`` (None where
    the records have no such prompts), ``ls_source`` (``"unedited"`` when ``ls`` is measured
    against ``locality_reference``, ``"answers"`` when against the data set's answers, None) and,
    with ``generation=True``, ``gen_es``, ``gen_gs``, ``gen_ls``, ``gen_pt`` (exact match),
    ``gen_es_prefix``, ``gen_gs_prefix``, ``gen_ls_prefix``, ``gen_pt_prefix`` (prefix match) and
    ``fluency`` (on ``fluency_prompts``, default :data:`DEFAULT_FLUENCY_PROMPTS`).
    With ``wild=True`` also ``wild_es``, ``wild_gs``, ``wild_pt`` (normalized exact match),
    ``wild_es_contains``, ``wild_gs_contains``, ``wild_pt_contains``, ``wild_ls`` (against the
    reference's unedited answers, captured with ``wild=True``; without a reference against the
    data set's locality answers), ``wild_ls_contains`` (see the module docstring),
    ``wild_ls_source`` and ``wild_examples`` (the first records' questions and answers, to
    read).
    With ``known_paraphrases`` (``(rewrite prompt, paraphrase)`` pairs, e.g.
    :func:`true_fact_scores`' ``known_paraphrases``) also ``gs_known``: GS over those
    paraphrases only (records without one are left out; None when no record has one).
    A locality prompt missing from ``locality_reference`` raises KeyError. ``portability=False``
    skips the portability prompts (``pt`` keys are then None), which saves their forward passes.
    ``progress`` is called with the number of prompts of each finished batch
    (:func:`evaluation_work` is the total). ``batch_size``: prompts per forward; None: 32 for
    the teacher-forced and generation scores, a KV-cache-sized batch for the WILD-style
    decoding (:func:`~ultraedit.eval.wild.decode_batch_size`).
    """
    records = list(records) if portability else _without_portability(records)
    rows = rows_per_batch(batch_size)
    out: Dict[str, object] = {"n": len(records)}
    if not records:
        for k in ("es", "gs", "ls", "ls_data", "pt", "ls_source"):
            out[k] = None
        return out
    ref = locality_reference
    pairs = _teacher_forced_pairs(records)
    acc = dict(zip(pairs, token_accuracy(model, tokenizer, [p for p, _ in pairs],
                                         [t for _, t in pairs], rows, progress)))
    out["es"] = _mean([acc[(r.prompt, r.target)] for r in records])
    out["gs"] = _per_record(records, lambda r: [(p, r.target) for p in r.paraphrases], acc)
    if known_paraphrases is not None:
        known = {tuple(k) for k in known_paraphrases}
        out["gs_known"] = _per_record(
            records, lambda r: [(p, r.target) for p in r.paraphrases if (r.prompt, p) in known],
            acc)
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
                                    [(ref.prompt_ids[k], ref.gold[k]) for k in keys], rows,
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
                                                 [t for _, t in gpairs], rows, progress)))
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
                                        [len(ref.generations[k]) for k in keys], rows,
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
                                 else fluency_prompts, batch_size=rows, progress=progress)
    if wild:
        out.update(wild_evaluation(model, tokenizer, records, ref, batch_size, progress))
    return out


_WILD_EXAMPLES = 5


def wild_evaluation(model, tokenizer, records: Sequence[EditRecord],
                    locality_reference: Optional[LocalityReference] = None,
                    batch_size: Optional[int] = None,
                    progress: Progress = None) -> Dict[str, object]:
    """Only the WILD-style scores of :func:`evaluate_records` (its ``wild_*`` keys, and ``n``);
    ``progress`` counts to :func:`wild_work`; ``batch_size`` as :func:`decode_answers`'."""
    records, ref = list(records), locality_reference
    out: Dict[str, object] = {"n": len(records)}
    if not records:
        return out
    loc_items = _wild_locality_items(records, ref)
    if ref is not None and loc_items:
        missing = [p for p, _ in loc_items if p not in ref.answers]
        if missing:
            raise KeyError(f"{len(missing)} locality prompts have no unedited answer in the "
                           f"reference, e.g. {missing[0]!r}; capture it with "
                           "locality_reference(..., wild=True) before editing")
    prompts = _wild_prompts(records, ref)
    answers = dict(zip(prompts, decode_answers(model, tokenizer, prompts, batch_size=batch_size,
                                               progress=progress)))
    pairs = _wild_pairs(records)
    judged = dict(zip(pairs, wild_judgements([answers[p] for p, _ in pairs],
                                             [t for _, t in pairs])))
    for name, j in (("", 0), ("_contains", 1)):
        score = {k: v[j] for k, v in judged.items()}
        out["wild_es" + name] = _mean([score[(wild_prompt(r.prompt, r.questions), r.target)]
                                       for r in records])
        out["wild_gs" + name] = _per_record(
            records, lambda r: [(wild_prompt(p, r.questions), r.target) for p in r.paraphrases],
            score)
        out["wild_pt" + name] = _per_record(
            records, lambda r: [(wild_prompt(p, r.questions), a) for p, a in r.portability],
            score)
    if ref is not None:
        same = {(p, a): float(answer_exact(answers[p], ref.answers[p])) for p, a in loc_items}
        out["wild_ls_source"] = "unedited" if loc_items else None
    else:
        same = {(p, a): float(answer_exact(answers[p], a)) for p, a in loc_items}
        out["wild_ls_source"] = "answers" if loc_items else None
    out["wild_ls"] = _per_record(
        records, lambda r: [(wild_prompt(lp.prompt, r.questions), lp.answer) for lp in r.locality
                            if ref is not None or lp.answer], same)
    # the locality fact itself: named before (by the unedited model) and still named
    kept = {(p, a): float(answer_contains(answers[p], a)) for p, a in loc_items
            if a and (ref is None or answer_contains(ref.answers[p], a))}
    out["wild_ls_contains"] = _per_record(
        records, lambda r: [k for k in ((wild_prompt(lp.prompt, r.questions), lp.answer)
                                        for lp in r.locality) if k in kept], kept)
    out["wild_examples"] = [
        {"prompt": wild_prompt(r.prompt, r.questions), "target": r.target,
         "answer": answers[wild_prompt(r.prompt, r.questions)]}
        for r in records[:_WILD_EXAMPLES]]
    return out


def _as_true_facts(records: Sequence[EditRecord]) -> List[EditRecord]:
    """The records whose true answer is known, asking for that answer: ``target`` becomes
    ``target_true``; the locality and portability prompts (about other answers) are dropped."""
    return [dataclasses.replace(r, target=r.target_true, locality=[], portability=[])
            for r in records if r.target_true]


def true_fact_work(records: Sequence[EditRecord], wild: bool = False) -> int:
    """How many prompts :func:`true_fact_scores` runs (its ``progress`` counts to this)."""
    facts = _as_true_facts(records)
    return len(_teacher_forced_pairs(facts)) + (wild_work(facts) if wild else 0)


def true_fact_scores(model, tokenizer, records: Sequence[EditRecord], wild: bool = False,
                     batch_size: Optional[int] = None,
                     progress: Progress = None) -> Dict[str, object]:
    """ES and GS of the model as it is now against each record's TRUE answer (``target_true``).

    Run on the unedited model, this is how well it states the facts it already knows: through
    the rewrite prompt (``es``; 1 for offline facts, which are chosen that way), through the
    paraphrases (``gs``) and, with ``wild=True``, through questions decoded to a stop string
    (``wild_es``, ``wild_gs`` and their ``_contains`` forms; see :func:`wild_evaluation`).
    ``known_paraphrases`` lists the ``[rewrite prompt, paraphrase]`` pairs whose true answer the
    model completes fully (teacher-forced accuracy 1): :func:`evaluate_records` scores an
    edit's GS over those (``gs_known``). Records without ``target_true`` are left out; ``n``
    counts the records scored (the scores are None when there are none). The scores equal
    :func:`evaluate_records`' and :func:`wild_evaluation`'s on
    ``replace(r, target=r.target_true, locality=[], portability=[])``; ``batch_size`` as
    theirs.
    """
    facts = _as_true_facts(records)
    out: Dict[str, object] = {"n": len(facts), "es": None, "gs": None, "known_paraphrases": []}
    if not facts:
        return out
    pairs = _teacher_forced_pairs(facts)
    acc = dict(zip(pairs, token_accuracy(model, tokenizer, [p for p, _ in pairs],
                                         [t for _, t in pairs], rows_per_batch(batch_size),
                                         progress)))
    out["es"] = _mean([acc[(r.prompt, r.target)] for r in facts])
    out["gs"] = _per_record(facts, lambda r: [(p, r.target) for p in r.paraphrases], acc)
    out["known_paraphrases"] = [[r.prompt, p] for r in facts for p in r.paraphrases
                                if acc[(p, r.target)] == 1.0]
    if wild:
        res = wild_evaluation(model, tokenizer, facts, batch_size=batch_size, progress=progress)
        for k in ("wild_es", "wild_gs", "wild_es_contains", "wild_gs_contains"):
            out[k] = res[k]
    return out


def check_record_lengths(tokenizer, records: Sequence[EditRecord],
                         max_length: Optional[int]) -> None:
    """A ``ValueError`` naming the first record (0-based) and field whose prompt with its answer
    does not fit ``max_length`` tokens (the model's context, ``turn.context_length``): the
    rewrite prompt and paraphrases with the longer of the new and true target, each locality
    and portability prompt with its answer, and each prompt's question in the WILD-style form.
    The evaluation scores all of them, and a model with learned positions (GPT-2) cannot run a
    longer sequence. Nothing runs: the prompts are only tokenized."""
    if max_length is None:
        return
    from ..tokenization import shown

    def size(text: Optional[str]) -> int:
        return len(tokenizer(text)["input_ids"]) if text else 0

    for i, r in enumerate(records):
        answer = max(size(" " + r.target), size(" " + r.target_true if r.target_true else None))
        fields = [("prompt", r.prompt, answer)]
        fields += [(f"paraphrases[{j}]", p, answer) for j, p in enumerate(r.paraphrases)]
        fields += [(f"locality[{j}]", lp.prompt, max(1, size(" " + lp.answer if lp.answer
                                                             else None)))
                   for j, lp in enumerate(r.locality)]
        fields += [(f"portability[{j}]", p, size(" " + a)) for j, (p, a) in
                   enumerate(r.portability)]
        for field, text, extra in fields:
            asked = wild_prompt(text, r.questions)    # the prompt itself unless it has a question
            need = max(size(text), size(asked) if asked != text else 0) + extra
            if need > max_length:
                raise ValueError(f"record {i}: its {field} {shown(text)} is {need} tokens with "
                                 f"its answer, longer than the model's context of {max_length}")

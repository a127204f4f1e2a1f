"""Fact selection: keep the facts the UNEDITED model already knows, so that an edit is measured
against knowledge that was there.

- :func:`filter_known`: the records whose true answer the model predicts (teacher-forced token
  accuracy 1.0 on ``target_true``).
- :func:`demo_records`, :func:`offline_records`: counterfactual records of the offline stand-in
  facts (``ultraedit.data.offline_facts``) that the model knows, relations interleaved, with
  locality prompts that are themselves edited in the selection dropped
  (``ultraedit.data.drop_edited_locality``).
"""

from __future__ import annotations

import random
import time
from typing import Any, Iterable, List, Optional, Sequence

from ..data.offline import offline_facts
from ..data.records import EditRecord, drop_edited_locality
from .probing import Progress, token_accuracy

__all__ = ["filter_known", "demo_records", "offline_records", "DEMO_RELATIONS", "RUN_RELATIONS"]

DEMO_RELATIONS = ("capital", "language")
# The relations of ``ultraedit run --data offline`` (two-hop city_capital is left out: its
# prompts are portability probes of the country relations). 1,000 known facts need city_country.
RUN_RELATIONS = ("capital", "language", "currency", "continent", "region", "city_country")


def filter_known(records: Iterable[EditRecord], model, tokenizer, batch_size: int = 32,
                 progress: Progress = None) -> List[EditRecord]:
    """Keep the records whose TRUE answer the unedited model already predicts: every token of
    ``" " + target_true`` is the argmax given the prompt and the gold prefix (teacher-forced token
    accuracy 1.0, :func:`ultraedit.eval.token_accuracy`). Records without ``target_true`` are
    dropped. Order is preserved."""
    records = [r for r in records if r.target_true]
    if not records:
        return []
    acc = token_accuracy(model, tokenizer, [r.prompt for r in records],
                         [r.target_true for r in records], batch_size=batch_size,
                         progress=progress)
    return [r for r, a in zip(records, acc) if a >= 1.0]


def _interleave(streams: Sequence[List[Any]]) -> List[Any]:
    out: List[Any] = []
    for i in range(max((len(s) for s in streams), default=0)):
        out += [s[i] for s in streams if i < len(s)]
    return out


def _too_few(known: int, need: int, relations) -> ValueError:
    return ValueError(f"only {known} facts of {list(relations)} are known to the model; "
                      f"{need} needed (lower --turns/--edits-per-turn or add relations)")


def demo_records(model, tokenizer, n: int, relations: Sequence[str] = DEMO_RELATIONS,
                 seed: int = 0, n_locality: int = 3, skip: int = 0, chunk: Optional[int] = None,
                 exclude_subjects: Sequence[str] = (), split: str = "all") -> List[EditRecord]:
    """``n`` counterfactual records whose true answer the unedited model predicts (the
    selection of ``ultraedit demo``).

    Candidates of each relation are shuffled with ``seed`` and interleaved round-robin; the
    first ``skip`` known records are passed over (so disjoint slices can be drawn), and
    subjects in ``exclude_subjects`` are never used. ``split`` (``"all"``, ``"tuning"``,
    ``"report"``) refuses relations outside it. Raises ValueError when fewer than ``n`` known
    facts exist.
    """
    excluded = set(exclude_subjects)
    streams = []
    for rel in relations:
        recs = [r for r in offline_facts((rel,), seed=seed, n_locality=n_locality, split=split)
                if r.subject not in excluded]
        random.Random(f"demo:{seed}:{rel}").shuffle(recs)
        streams.append(recs)
    candidates = _interleave(streams)
    known: List[EditRecord] = []
    need = n + skip
    # about a third of the candidates are known: check a few times what is still needed at once
    chunk = chunk or max(32, 2 * need)
    for start in range(0, len(candidates), chunk):
        known += filter_known(candidates[start:start + chunk], model, tokenizer)
        if len(known) >= need:
            break
    if len(known) < need:
        raise _too_few(len(known), need, relations)
    return drop_edited_locality(known[skip:need])


def offline_records(model, tokenizer, n: int, relations: Sequence[str] = RUN_RELATIONS,
                    seed: int = 0, exclude_subjects: Sequence[str] = (), n_locality: int = 3,
                    batch_size: int = 32, split: str = "all",
                    deadline: Optional[float] = None,
                    progress: Progress = None) -> List[EditRecord]:
    """``n`` counterfactual offline records whose TRUE answer the unedited model predicts
    (:func:`filter_known`), relations interleaved round-robin (the selection of
    ``ultraedit run --data offline``).

    Country relations are shuffled with ``seed``; cities are taken by population, largest first
    (the model knows far more of them, so fewer candidates are checked). Subjects in
    ``exclude_subjects`` are never used (e.g. facts a setting was tuned on). ``split``
    (``"all"``, ``"tuning"``, ``"report"``; ``ultraedit.data.split_relations``) refuses relations
    outside it. Locality prompts that are themselves edited in the run are dropped. ValueError
    when fewer than ``n`` known facts exist, or when ``deadline`` (a ``time.perf_counter()``
    value) passes before ``n`` are found. ``progress(k)`` is called as ``k`` more candidates
    have been checked."""
    excluded = set(exclude_subjects)
    streams = []
    for rel in relations:
        recs = [r for r in offline_facts((rel,), seed=seed, n_locality=n_locality, split=split)
                if r.subject not in excluded]
        if not rel.startswith("city"):
            random.Random(f"run:{seed}:{rel}").shuffle(recs)
        streams.append(recs)
    candidates = _interleave(streams)
    known: List[EditRecord] = []
    start = 0
    while len(known) < n and start < len(candidates):
        if deadline is not None and time.perf_counter() > deadline:
            raise ValueError(f"found only {len(known)} of {n} facts of {list(relations)} known to "
                             f"the model after checking {start} of {len(candidates)} within the "
                             f"time allowed")
        chunk = max(64, int(1.6 * (n - len(known))))
        known += filter_known(candidates[start:start + chunk], model, tokenizer,
                              batch_size=batch_size, progress=progress)
        start += chunk
    if len(known) < n:
        raise _too_few(len(known), n, relations)
    return drop_edited_locality(known[:n])

"""WILD-style scores: ask, decode greedily to a stop string, judge the answer.

Teacher forcing hands the model the gold prefix and our generation score decodes exactly as many
tokens as the target has; both are kinder than a user asking the model. These scores follow the
WILD protocol (Yang et al., 2025, "The Mirage of Model Editing"):

- **the prompt**: a record's prompt that its source also asks as a question
  (``record.questions[prompt]``: zsRE's ``src`` questions, the offline facts' question
  templates) is asked as ``QA_TEMPLATE.format(question=...)``, i.e.
  ``"Q: What is the capital of France?\\nA:"``; any other prompt (a cloze like CounterFact's) is
  used as it is (:func:`wild_prompt`);
- **the answer**: greedy decoding (KV cache, left-padded batches) until EOS (or another special
  token, e.g. ``<|endoftext|>``), or until the decoded text contains a stop string
  (:data:`STOP_STRINGS`: ``"."`` and a newline; the answer is the text before it), at most
  :data:`MAX_NEW_TOKENS` new tokens (:func:`decode_answers`);
- **the judgement** on SQuAD-normalized text (:func:`normalize_answer`: lowercase, punctuation,
  the articles a/an/the and extra whitespace removed): ``exact`` = the normalized answer equals
  the normalized target; ``contains`` = the normalized target occurs in the normalized answer
  as whole words (``"the Japanese yen"`` contains ``"yen"``; ``"Romeo"`` does not contain
  ``"Rome"``);
- **locality**: the edited model's normalized answer to a locality prompt equals the UNEDITED
  model's normalized answer (captured before the first edit by
  :func:`~ultraedit.eval.locality_reference` with ``wild=True``).

A ``"."`` stop cuts answers with abbreviations ("Washington, D.C." -> "Washington, D"), as WILD
does; ``contains`` still credits such answers when the target precedes the cut.

:func:`edit_requests` makes a record's edit requests in the wording a user asks the model in:
the rewrite prompt, the same prompt asked as a question (as above), or both.
"""

from __future__ import annotations

import re
import string
from typing import Iterable, List, Optional, Sequence, Set, Tuple

import torch

from ..tokenization import _pad_id, shown, special_prefix
from .probing import (Progress, _cache_of, _device, _eval, _keep_rows, _prefill, _prompt_ids,
                      _stepper, _tick, rows_per_batch)

__all__ = ["QA_TEMPLATE", "STOP_STRINGS", "MAX_NEW_TOKENS", "normalize_answer", "answer_exact",
           "answer_contains", "wild_prompt", "EDIT_WORDINGS", "check_wordings", "edit_requests",
           "decode_answers", "decode_batch_size", "wild_judgements"]

QA_TEMPLATE = "Q: {question}\nA:"
STOP_STRINGS: Tuple[str, ...] = (".", "\n")
MAX_NEW_TOKENS = 50

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, remove punctuation, remove the articles a/an/the, collapse
    whitespace. ``normalize_answer("The  Japanese Yen!") == "japanese yen"``."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_exact(answer: str, target: str) -> bool:
    """The normalized answer equals the normalized target."""
    return normalize_answer(answer) == normalize_answer(target)


def answer_contains(answer: str, target: str) -> bool:
    """The normalized target occurs in the normalized answer as whole words (a target that
    normalizes to nothing, e.g. ``"The"``, counts only as an exact match)."""
    a, t = normalize_answer(answer), normalize_answer(target)
    if not t:
        return a == t
    return f" {t} " in f" {a} "


def wild_prompt(prompt: str, questions: Optional[dict] = None) -> str:
    """The prompt the WILD-style scores decode from: ``QA_TEMPLATE`` around
    ``questions[prompt]`` when the record has that question, else ``prompt`` itself."""
    question = (questions or {}).get(prompt)
    return prompt if question is None else QA_TEMPLATE.format(question=question)


# Which wordings of a record's fact the editor is given (``edit_requests``).
EDIT_WORDINGS = ("prompt", "question", "both")


def check_wordings(wordings: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``wordings`` is one of ``EDIT_WORDINGS``."""
    if wordings not in EDIT_WORDINGS:
        raise ValueError(f"wordings must be one of {', '.join(EDIT_WORDINGS)}; got {wordings!r}")


def edit_requests(record, wordings: str = "prompt") -> List[dict]:
    """The edit requests of one record, in the wordings a user asks the model in.

    ``"prompt"``: ``record.as_request()`` (the rewrite prompt as the data gives it).
    ``"question"``: the same request with its prompt asked the way the WILD-style scores ask it,
    ``wild_prompt(record.prompt, record.questions)`` (``"Q: What is the capital of France?\\nA:"``;
    the rewrite prompt itself when the record has no question for it). ``"both"``: the two, the
    question only when it differs from the prompt. Target and subject are the record's in every
    request; a paraphrase's question is never used."""
    check_wordings(wordings)
    request = dict(record.as_request())
    if wordings == "prompt":
        return [request]
    asked = dict(request, prompt=wild_prompt(record.prompt, getattr(record, "questions", None)))
    if wordings == "question":
        return [asked]
    return [request] if asked["prompt"] == request["prompt"] else [request, asked]


def asked_as_questions(record):
    """A copy of ``record`` with every prompt that it also asks as a question replaced by the
    prompt the WILD-style scores decode from, ``wild_prompt(prompt, record.questions)``: the
    rewrite prompt, the paraphrases, the locality and portability prompts (``questions``
    becomes empty, so the WILD-style scores of the copy ask the same prompts as the original's).

    Teacher-forced scores of the copy (:func:`ultraedit.eval.evaluate_records`) are then scores
    on the questions: ES on ``"Q: <question>\\nA:"`` -> `` target``, and so on. The copy's
    ``as_request()`` is ``edit_requests(record, "question")[0]``. A record without questions
    comes back as an equal copy."""
    from dataclasses import replace

    from ..data.records import LocalityPrompt

    questions = getattr(record, "questions", None) or {}

    def ask(prompt: str) -> str:
        return wild_prompt(prompt, questions)

    return replace(record, prompt=ask(record.prompt),
                   paraphrases=[ask(p) for p in record.paraphrases],
                   locality=[LocalityPrompt(ask(x.prompt), x.answer) for x in record.locality],
                   portability=[(ask(p), a) for p, a in record.portability],
                   questions={}, extra=dict(record.extra))


def scored_records(records, wordings: str = "prompt") -> list:
    """The records whose teacher-forced scores judge edits made in ``wordings``: ``records``
    themselves (``"prompt"``), :func:`asked_as_questions` of each (``"question"``), or both
    lists one after the other (``"both"``, so each score is the mean over the two wordings)."""
    check_wordings(wordings)
    records = list(records)
    if wordings == "prompt":
        return records
    asked = [asked_as_questions(r) for r in records]
    return asked if wordings == "question" else records + asked


def _eos_ids(model, tokenizer) -> Set[int]:
    """Tokens that end an answer: the tokenizer's and the model's EOS, and every other special
    token (a chat model's ``<|endoftext|>`` or ``<|im_start|>`` is not part of an answer)."""
    ids: Set[int] = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    for source in (tokenizer, getattr(model, "generation_config", None),
                   getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids |= {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}
    return ids


def _cut(text: str, stops: Sequence[str]) -> Optional[str]:
    """``text`` before its first stop string, or None when it has none."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[:min(hits)] if hits else None


# decoding batches: as many rows as a KV cache of DECODE_CACHE_BYTES holds, within DECODE_ROWS.
# A batch runs until its last row stops, and its late steps carry few rows, each step streaming
# every weight for them; fewer, larger batches spend fewer such steps. Measured on the 2-core
# CPU (embedded model, 512 prompts of the README's records, one thread, two alternating rounds;
# experiments/wild_decode_batches.py --sweep): 32 rows 62.1 / 62.8 s, 64 rows 43.5 / 43.4 s,
# 128 rows 35.4 / 35.5 s, 256 rows 33.1 / 33.7 s, the same token ids at every size.
DECODE_CACHE_BYTES = 1 << 30
DECODE_ROWS = (32, 256)


def decode_batch_size(model, prompt_tokens: int, max_new_tokens: int = MAX_NEW_TOKENS) -> int:
    """Rows per batch of :func:`decode_answers` for ``model``: the number whose KV cache of
    ``prompt_tokens + max_new_tokens`` positions fits :data:`DECODE_CACHE_BYTES` (keys and values
    of every layer, in the model's dtype), clamped to :data:`DECODE_ROWS`; the smallest when the
    config does not say its layers, heads and sizes."""
    low, high = DECODE_ROWS
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    try:
        layers = int(cfg.num_hidden_layers)
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads)
        param = next(model.parameters())
    except (AttributeError, TypeError, ValueError, ZeroDivisionError, StopIteration):
        return low
    per_row = (2 * layers * kv_heads * head_dim * param.element_size()
               * max(1, int(prompt_tokens) + int(max_new_tokens)))
    return max(low, min(high, DECODE_CACHE_BYTES // max(1, per_row)))


# the position-embedding tables of models whose positions are learned (GPT-2 and GPT-J-like
# ``wpe``, OPT's ``embed_positions``, BERT-like ``position_embeddings``)
_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def learned_position_limit(model) -> Optional[int]:
    """The model's context (``turn.context_length``) when its positions are a learned table,
    which has no row past it; None for rotary or ALiBi positions, which run on (past the
    trained length, as the model's own ``generate`` does)."""
    from ..turn import context_length

    tables = [m for name, m in model.named_modules()
              if name.rsplit(".", 1)[-1] in _POSITION_TABLES and isinstance(m, torch.nn.Embedding)]
    return context_length(model) if tables else None


def decode_answers(model, tokenizer, prompts: Sequence[str],
                   max_new_tokens: int = MAX_NEW_TOKENS,
                   stop_strings: Sequence[str] = STOP_STRINGS,
                   batch_size: Optional[int] = None,
                   progress: Progress = None, return_ids: bool = False):
    """Greedy answers to ``prompts``: decode until EOS or another special token (not part of the
    answer), until the decoded
    text contains one of ``stop_strings`` (the answer is the text before the first one), or
    ``max_new_tokens`` new tokens. Returns the answers (stripped of surrounding whitespace), or
    with ``return_ids`` ``(answers, generated token ids per prompt)``; the ids end at the token
    that stopped the row.

    Batched by prompt length with left padding and a KV cache; rows that have stopped leave the
    batch (their rows of the cache are dropped), and a batch ends when all of its rows have. Equal, row for row, to decoding each prompt alone (what
    ``model.generate(..., do_sample=False, stop_strings=..., max_new_tokens=...)`` returns,
    decoded and cut at the stop string). On a model with learned absolute positions (GPT-2,
    OPT: :func:`learned_position_limit`) a row also ends where they end, and a prompt that fills
    them is a ValueError naming it.
    ``batch_size``: prompts per batch; None sizes it by the KV cache
    (:func:`decode_batch_size`)."""
    prompts = list(prompts)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    prefix = special_prefix(tokenizer)
    rows = [_prompt_ids(tokenizer, p, prefix) for p in prompts]
    limit = learned_position_limit(model)    # a row also stops where the positions end
    if limit is not None:
        for p, r in zip(prompts, rows):
            if len(r) >= limit:
                raise ValueError(f"the prompt {shown(p)} is {len(r)} tokens, which leaves no "
                                 f"room to decode an answer in the model's context of {limit}")
    if batch_size is None:
        batch_size = decode_batch_size(model, max((len(r) for r in rows), default=0),
                                       max_new_tokens)
    batch_size = rows_per_batch(batch_size)
    answers: List[Optional[str]] = [None] * len(rows)
    ids_out: List[Optional[List[int]]] = [None] * len(rows)
    eos = _eos_ids(model, tokenizer)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    device, pad = _device(model), _pad_id(tokenizer)
    net, last_logits, cache_arg = _stepper(model)
    with _eval(model):
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            res, att, pos = _prefill(net, [rows[i] for i in idx], pad, device)
            cache = _cache_of(res)
            gen: List[List[int]] = [[] for _ in idx]
            rows_now = list(range(len(idx)))    # batch row -> index into idx
            for step in range(max_new_tokens):
                nxt = last_logits(res).argmax(-1)
                keep = []
                for r, t in enumerate(nxt.tolist()):
                    b = rows_now[r]
                    if b is None:               # stopped, still computed (cache not compactable)
                        continue
                    gen[b].append(t)
                    if t in eos:
                        answers[idx[b]] = tokenizer.decode(gen[b][:-1], skip_special_tokens=True)
                        rows_now[r] = None
                        continue
                    cut = _cut(tokenizer.decode(gen[b], skip_special_tokens=True), stop_strings)
                    if cut is not None:
                        answers[idx[b]] = cut
                        rows_now[r] = None
                    elif limit is not None and len(rows[idx[b]]) + len(gen[b]) >= limit:
                        rows_now[r] = None      # the context is full: the answer ends here
                    else:
                        keep.append(r)
                if not keep or step == max_new_tokens - 1:
                    break
                cache, rows_now, (nxt, att, pos) = _keep_rows(cache, rows_now, keep, device, nxt,
                                                              att, pos)
                att = torch.cat([att, att.new_ones((att.shape[0], 1))], dim=1)
                pos = pos[:, -1:] + 1
                res = net(input_ids=nxt[:, None], attention_mask=att, position_ids=pos,
                          use_cache=True, **{cache_arg: cache})
                cache = _cache_of(res)
            for b, i in enumerate(idx):
                if answers[i] is None:     # ran to max_new_tokens
                    answers[i] = tokenizer.decode(gen[b], skip_special_tokens=True)
                answers[i] = answers[i].strip()
                ids_out[i] = gen[b]
            _tick(progress, len(idx))
    return (answers, ids_out) if return_ids else answers


def wild_judgements(answers: Iterable[str], targets: Iterable[str]) -> List[Tuple[float, float]]:
    """Per ``(answer, target)``: ``(exact, contains)`` as floats (see the module docstring)."""
    return [(float(answer_exact(a, t)), float(answer_contains(a, t)))
            for a, t in zip(answers, targets)]

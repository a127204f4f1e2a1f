"""Edit-quality metrics: teacher-forced token accuracy, locality against the unedited model,
generation-based (WILD-style) scores and fluency.

Definitions (all scores in 0..1, except fluency in bits):

- **Teacher-forced token accuracy** of ``(prompt, target)``: with the batch of
  ``ultraedit.tokenization.encode_edit_batch`` (input = prompt + target[:-1], ``labels`` already
  shifted), the fraction of answer positions ``t`` (``labels[t] != -100``) where
  ``logits[t].argmax() == labels[t]``, i.e. target tokens predicted given the gold prefix.
- **ES** (efficacy) = mean over records of the accuracy of ``(prompt, target)``; **GS**
  (generalization) = mean over records with paraphrases of the mean accuracy over its
  paraphrases; **PT** (portability) likewise over ``(prompt, answer)`` portability pairs.
- **LS** (locality) with a :class:`LocalityReference` captured from the UNEDITED model: per
  locality prompt, the fraction of positions where the edited model's teacher-forced argmax equals
  the unedited model's argmax (gold prefix = the data set's answer, or the unedited model's own
  greedy continuation when the data set gives no answer); averaged per record, then over records.
  ``ls_data`` is the teacher-forced accuracy on the data set's locality answers (where given).
  Without a reference, ``ls`` is ``ls_data`` and ``ls_source`` says so.
- **Generation** (no teacher forcing): greedy decoding of ``len(target tokens)`` new tokens after
  the prompt. Exact match = the generated tokens equal the target tokens (or decode to the same
  stripped text); prefix match = length of the common token prefix / number of target tokens.
  ``gen_ls`` compares with the unedited model's greedy continuation stored in the reference.
- **Fluency**: the weighted 2-/3-gram entropy of ROME/MEMIT, ``mean(2/3 * H2, 4/3 * H3)`` with
  ``Hn = -sum p log2 p`` over the n-gram frequency distribution of one greedy generation (words and
  punctuation as tokens), averaged over a few open prompts. Repetitive text scores low.

Everything runs under ``torch.inference_mode()`` with the model in eval mode (its mode is
restored afterwards), batched, on the model's device.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .data.records import EditRecord
from .tokenization import encode_edit_batch, encode_request, special_prefix

__all__ = [
    "token_accuracy", "next_token_predictions", "greedy_continuations", "generation_scores",
    "ngram_entropy", "fluency", "locality_reference", "LocalityReference", "evaluate_records",
    "DEFAULT_FLUENCY_PROMPTS",
]

DEFAULT_FLUENCY_PROMPTS = (
    "The history of the city of Paris",
    "My favourite food is",
    "Scientists have recently discovered that",
    "The main reasons people travel abroad are",
    "In the morning, the village",
)

# Tokens a locality prompt without an answer is judged on (the unedited greedy continuation).
FREE_LOCALITY_TOKENS = 3


@contextlib.contextmanager
def _eval(model):
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _split_head(model):
    """``(base, head)`` when the model is a Hugging Face ``base_model`` followed by an output
    embedding (so logits = head(base(...).last_hidden_state)); ``(None, None)`` otherwise.
    Running the head only where a prediction is needed skips most of the vocabulary projection
    (about a fifth of a small model's FLOPs); argmax is unchanged by any final monotone logit
    scaling or soft-capping a model applies after the head."""
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if base is None or base is model or head is None:
        return None, None
    return base, head


def _argmax_at_labels(model, batch: Dict[str, torch.Tensor]) -> List[Tuple[List[int], List[int]]]:
    """Forward one right-padded batch; per row ``(argmax at answer positions, labels there)``."""
    labels = batch["labels"]
    mask = labels != -100
    base, head = _split_head(model)
    if base is not None:
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        flat = head(hidden[mask]).argmax(-1)          # answer positions, row-major order
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        flat = logits.argmax(-1)[mask]
    counts = mask.sum(1).tolist()
    preds = flat.split(counts)
    gold = labels[mask].split(counts)
    return [(p.tolist(), g.tolist()) for p, g in zip(preds, gold)]


def _batch_from_ids(rows: Sequence[Tuple[List[int], List[int]]], pad: int,
                    device) -> Dict[str, torch.Tensor]:
    """The encode_edit_batch layout built from ``(prompt_ids, gold_ids)`` token rows."""
    width = max(len(p) + len(g) - 1 for p, g in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, (p, g) in enumerate(rows):
        seq = list(p) + list(g[:-1])
        ids[b, :len(seq)] = torch.tensor(seq)
        att[b, :len(seq)] = 1
        lab[b, len(p) - 1:len(seq)] = torch.tensor(list(g))
    return {"input_ids": ids.to(device), "attention_mask": att.to(device),
            "labels": lab.to(device)}


def _by_length(n: int, key) -> List[int]:
    """Indices 0..n-1 sorted by ``key`` (batches of similar length pad less)."""
    return sorted(range(n), key=key)


def _check(prompts, targets):
    prompts, targets = list(prompts), list(targets)
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    return prompts, targets


def _teacher_forced(model, tokenizer, prompts, targets, batch_size):
    """Per pair ``(predicted ids, gold target ids)`` at the answer positions."""
    prompts, targets = _check(prompts, targets)
    out: List = [None] * len(prompts)
    if not prompts:
        return out
    order = _by_length(len(prompts), lambda i: len(prompts[i]) + len(targets[i]))
    device = _device(model)
    with _eval(model):
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = encode_edit_batch(tokenizer, [prompts[i] for i in idx],
                                      [targets[i] for i in idx], device)
            for i, row in zip(idx, _argmax_at_labels(model, batch)):
                out[i] = row
    return out


def _teacher_forced_ids(model, tokenizer, rows, batch_size):
    """Like :func:`_teacher_forced` for ``(prompt_ids, gold_ids)`` rows; returns predicted ids."""
    out: List = [None] * len(rows)
    order = _by_length(len(rows), lambda i: len(rows[i][0]) + len(rows[i][1]))
    device, pad = _device(model), _pad_id(tokenizer)
    with _eval(model):
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = _batch_from_ids([rows[i] for i in idx], pad, device)
            for i, (pred, _) in zip(idx, _argmax_at_labels(model, batch)):
                out[i] = pred
    return out


def token_accuracy(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                   batch_size: int = 32) -> List[float]:
    """Teacher-forced token accuracy per ``(prompt, target)`` pair: the fraction of the target's
    tokens (with one leading space) that are the model's argmax given the prompt and the gold
    prefix. Equivalent to, per pair::

        b = encode_edit_batch(tok, [p], [t]); m = b["labels"] != -100
        (model(**b).logits.argmax(-1)[m] == b["labels"][m]).float().mean()
    """
    return [sum(int(a == b) for a, b in zip(pred, gold)) / len(gold)
            for pred, gold in _teacher_forced(model, tokenizer, prompts, targets, batch_size)]


def _prompt_ids(tokenizer, prompt: str, prefix) -> List[int]:
    # The prompt's tokens as encode_edit_batch produces them (the dummy target is not used).
    return encode_request(tokenizer, prompt, "x", prefix)[0]


def next_token_predictions(model, tokenizer, prompts: Sequence[str],
                           targets: Optional[Sequence[Optional[str]]] = None,
                           batch_size: int = 32) -> List[List[int]]:
    """The model's argmax token ids, per prompt.

    With ``targets[i]`` given: the argmax at each of that target's answer positions under teacher
    forcing (as many ids as target tokens). With no target (``targets`` None, or an item None):
    ``[argmax of the next token after the prompt]``.
    """
    prompts = list(prompts)
    targets = [None] * len(prompts) if targets is None else list(targets)
    _check(prompts, targets)
    out: List = [None] * len(prompts)
    given = [i for i, t in enumerate(targets) if t is not None]
    for i, (pred, _) in zip(given, _teacher_forced(model, tokenizer, [prompts[i] for i in given],
                                                   [targets[i] for i in given], batch_size)):
        out[i] = pred
    free = [i for i, t in enumerate(targets) if t is None]
    if free:
        prefix = special_prefix(tokenizer)
        gens = greedy_continuations(model, tokenizer,
                                    [_prompt_ids(tokenizer, prompts[i], prefix) for i in free],
                                    1, batch_size)
        for i, g in zip(free, gens):
            out[i] = g
    return out


def greedy_continuations(model, tokenizer, prompt_ids: Sequence[Sequence[int]],
                         max_new_tokens, batch_size: int = 32) -> List[List[int]]:
    """Greedy decoding without teacher forcing: for each prompt (token ids, special prefix
    included), ``max_new_tokens`` (an int, or one int per prompt) new token ids, each the argmax
    given the prompt and the tokens generated so far. Never stops early (no EOS handling), so
    every row has exactly its requested length. Left-padded batches with a KV cache."""
    rows = [list(p) for p in prompt_ids]
    n_new = ([int(max_new_tokens)] * len(rows) if isinstance(max_new_tokens, int)
             else [int(n) for n in max_new_tokens])
    if len(n_new) != len(rows):
        raise ValueError(f"{len(rows)} prompts but {len(n_new)} lengths")
    out: List = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), n_new[i]))
    device, pad = _device(model), _pad_id(tokenizer)
    base, head = _split_head(model)
    if base is not None:
        net = base
        last_logits = lambda res: head(res[0][:, -1])      # noqa: E731
    else:
        net = model
        last_logits = lambda res: res.logits[:, -1]         # noqa: E731
    cache_arg = _cache_argument(net)
    with _eval(model):
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            steps = max(n_new[i] for i in idx)
            if steps <= 0:
                for i in idx:
                    out[i] = []
                continue
            width = max(len(rows[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for b, i in enumerate(idx):
                ids[b, width - len(rows[i]):] = torch.tensor(rows[i])
                att[b, width - len(rows[i]):] = 1
            ids, att = ids.to(device), att.to(device)
            pos = (att.cumsum(-1) - 1).clamp(min=0)
            res = net(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
            generated = []
            for step in range(steps):
                nxt = last_logits(res).argmax(-1)
                generated.append(nxt)
                if step == steps - 1:
                    break
                att = torch.cat([att, att.new_ones((att.shape[0], 1))], dim=1)
                pos = pos[:, -1:] + 1
                res = net(input_ids=nxt[:, None], attention_mask=att, position_ids=pos,
                          use_cache=True, **{cache_arg: _cache_of(res)})
            gen = torch.stack(generated, dim=1).tolist()
            for b, i in enumerate(idx):
                out[i] = gen[b][:n_new[i]]
    return out


def _cache_argument(model) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.2x) or the older
    ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(output):
    return output.cache if hasattr(output, "cache") else output.past_key_values


def _prefix_fraction(gen: Sequence[int], gold: Sequence[int]) -> float:
    n = 0
    for a, b in zip(gen, gold):
        if a != b:
            break
        n += 1
    return n / len(gold) if gold else 0.0


def generation_scores(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                      batch_size: int = 32) -> List[Tuple[float, float]]:
    """Per pair ``(exact, prefix)`` from greedy decoding ``len(target tokens)`` tokens after the
    prompt: ``exact`` is 1.0 when the generated ids equal the target ids or decode to the same
    stripped text, ``prefix`` the common-prefix length over the target length."""
    prompts, targets = _check(prompts, targets)
    prefix = special_prefix(tokenizer)
    pairs = [encode_request(tokenizer, p, t, prefix) for p, t in zip(prompts, targets)]
    gens = greedy_continuations(model, tokenizer, [p for p, _ in pairs],
                                [len(t) for _, t in pairs], batch_size)
    out = []
    for (_, gold), gen, target in zip(pairs, gens, targets):
        exact = gen == gold or tokenizer.decode(gen).strip() == target.strip()
        out.append((float(exact), _prefix_fraction(gen, gold)))
    return out


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
            max_new_tokens: int = 40, batch_size: int = 32) -> float:
    """Mean :func:`ngram_entropy` of the greedy continuations (``max_new_tokens`` tokens, the
    prompt excluded) of ``prompts``."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("fluency needs at least one prompt")
    prefix = special_prefix(tokenizer)
    gens = greedy_continuations(model, tokenizer, [_prompt_ids(tokenizer, p, prefix)
                                                   for p in prompts], max_new_tokens, batch_size)
    return sum(ngram_entropy(tokenizer.decode(g, skip_special_tokens=True))
               for g in gens) / len(prompts)


@dataclass
class LocalityReference:
    """The unedited model's behaviour on locality prompts, keyed by ``(prompt, answer)``.

    ``gold[key]``: the token ids used as teacher-forcing prefix (the answer's tokens, or the
    unedited greedy continuation when ``answer`` is None); ``predictions[key]``: the unedited
    argmax at those positions; ``generations[key]``: the unedited greedy continuation of the
    same length (only when captured with ``generation=True``); ``prompt_ids[key]``.
    """

    prompt_ids: Dict[Tuple[str, Optional[str]], List[int]] = field(default_factory=dict)
    gold: Dict[Tuple[str, Optional[str]], List[int]] = field(default_factory=dict)
    predictions: Dict[Tuple[str, Optional[str]], List[int]] = field(default_factory=dict)
    generations: Dict[Tuple[str, Optional[str]], List[int]] = field(default_factory=dict)

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


def locality_reference(model, tokenizer, records: Sequence[EditRecord], generation: bool = False,
                       batch_size: int = 32,
                       reference: Optional[LocalityReference] = None) -> LocalityReference:
    """Capture the UNEDITED model's predictions on every locality prompt of ``records`` (call it
    before editing; pass the result to :func:`evaluate_records` after). With ``reference`` given,
    only prompts it lacks are computed and it is extended in place (lifelong runs)."""
    ref = reference if reference is not None else LocalityReference()
    keys = [k for k in _locality_keys(records)
            if k not in ref or (generation and k not in ref.generations)]
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
                                    FREE_LOCALITY_TOKENS, batch_size)
        for k, g in zip(free, gens):
            ref.gold[k] = g
            ref.predictions[k] = list(g)   # greedy = argmax given its own prefix
            ref.generations[k] = list(g)
    if answered:
        preds = _teacher_forced_ids(model, tokenizer,
                                    [(ref.prompt_ids[k], ref.gold[k]) for k in answered],
                                    batch_size)
        for k, p in zip(answered, preds):
            ref.predictions[k] = p
        if generation:
            gens = greedy_continuations(model, tokenizer, [ref.prompt_ids[k] for k in answered],
                                        [len(ref.gold[k]) for k in answered], batch_size)
            for k, g in zip(answered, gens):
                ref.generations[k] = g
    return ref


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


def evaluate_records(model, tokenizer, records: Sequence[EditRecord],
                     locality_reference: Optional[LocalityReference] = None,
                     generation: bool = False, batch_size: int = 32,
                     fluency_prompts: Optional[Sequence[str]] = None,
                     portability: bool = True) -> Dict[str, object]:
    """Score ``records`` on the model as it is now (see the module docstring for definitions).

    Returns a dict with ``n`` (records), ``es``, ``gs``, ``ls``, ``ls_data``, ``pt`` (None where
    the records have no such prompts), ``ls_source`` (``"unedited"`` when ``ls`` is measured
    against ``locality_reference``, ``"answers"`` when against the data set's answers, None) and,
    with ``generation=True``, ``gen_es``, ``gen_gs``, ``gen_ls``, ``gen_pt`` (exact match),
    ``gen_es_prefix``, ``gen_gs_prefix``, ``gen_ls_prefix``, ``gen_pt_prefix`` (prefix match) and
    ``fluency`` (on ``fluency_prompts``, default :data:`DEFAULT_FLUENCY_PROMPTS`).
    A locality prompt missing from ``locality_reference`` raises KeyError. ``portability=False``
    skips the portability prompts (``pt`` keys are then None), which saves their forward passes.
    """
    records = list(records)
    if not portability:
        records = [EditRecord(prompt=r.prompt, target=r.target, paraphrases=r.paraphrases,
                              locality=r.locality, subject=r.subject, relation=r.relation,
                              target_true=r.target_true, extra=r.extra) for r in records]
    out: Dict[str, object] = {"n": len(records)}
    if not records:
        for k in ("es", "gs", "ls", "ls_data", "pt", "ls_source"):
            out[k] = None
        return out
    ref = locality_reference
    # One teacher-forced pass over all unique (prompt, target) string pairs.
    pairs = []
    for r in records:
        pairs.append((r.prompt, r.target))
        pairs += [(p, r.target) for p in r.paraphrases]
        pairs += [(lp.prompt, lp.answer) for lp in r.locality if lp.answer is not None]
        pairs += list(r.portability)
    pairs = list(dict.fromkeys(pairs))
    acc = dict(zip(pairs, token_accuracy(model, tokenizer, [p for p, _ in pairs],
                                         [t for _, t in pairs], batch_size)))
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
                                    [(ref.prompt_ids[k], ref.gold[k]) for k in keys], batch_size)
        same = {k: sum(int(a == b) for a, b in zip(p, ref.predictions[k])) / len(p)
                for k, p in zip(keys, preds)}
        out["ls"] = _per_record(records, lambda r: [(lp.prompt, lp.answer) for lp in r.locality],
                                same)
        out["ls_source"] = "unedited"
    else:
        out["ls"] = out["ls_data"]
        out["ls_source"] = "answers" if out["ls_data"] is not None else None
    if generation:
        gpairs = []
        for r in records:
            gpairs.append((r.prompt, r.target))
            gpairs += [(p, r.target) for p in r.paraphrases]
            gpairs += list(r.portability)
            if ref is None:
                gpairs += [(lp.prompt, lp.answer) for lp in r.locality if lp.answer]
        gpairs = list(dict.fromkeys(gpairs))
        gen = dict(zip(gpairs, generation_scores(model, tokenizer, [p for p, _ in gpairs],
                                                 [t for _, t in gpairs], batch_size)))
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
                                        [len(ref.generations[k]) for k in keys], batch_size)
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
                                 else fluency_prompts, batch_size=batch_size)
    return out

"""Probing a model: teacher-forced predictions at the answer positions and greedy decoding.

- :func:`token_accuracy`: per ``(prompt, target)``, with the batch of
  ``ultraedit.tokenization.encode_edit_batch`` (input = prompt + target[:-1], ``labels`` already
  shifted), the fraction of answer positions ``t`` (``labels[t] != -100``) where
  ``logits[t].argmax() == labels[t]``: target tokens predicted given the gold prefix. On the
  CPU a batch runs as one packed sequence of its tokens where the model allows
  (``ultraedit.packing``): the same predictions up to rounding, without padding.
- :func:`greedy_continuations` / :func:`generation_scores`: greedy decoding without teacher
  forcing; exact match = the generated tokens equal the target tokens (or decode to the same
  stripped text), prefix match = length of the common token prefix / number of target tokens.

Everything runs under ``torch.inference_mode()`` with the model in eval mode (its mode is
restored afterwards), batched (prompts of similar length together), on the model's device.
``progress``, where accepted, is called with the number of prompts each finished batch held.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..packing import PackedLayout, on_cpu, packed, unpackable
from ..tokenization import _pad_id, encode_edit_batch, encode_request, special_prefix

__all__ = ["token_accuracy", "next_token_predictions", "greedy_continuations",
           "generation_scores", "Progress"]

Progress = Optional[Callable[[int], None]]

# prompts per forward of teacher-forced scoring and of fixed-length greedy generation. Measured
# on the 2-core CPU (embedded model, 768 prompts of the README's records, one thread,
# alternating rounds): teacher-forced scoring the same at 32 and 128; greedy generation, whose
# rows leave the batch once they have their tokens, 18.7 s at 32, 17.5 s at 128 and 19.7 s at
# 256 (20.8 s at 32 with every row kept to the batch's longest). WILD-style decoding, whose
# answers run up to 50 tokens, sizes its own (:func:`ultraedit.eval.wild.decode_batch_size`).
BATCH_SIZE = 32


def rows_per_batch(batch_size: Optional[int]) -> int:
    """``batch_size``, or :data:`BATCH_SIZE` for None; anything else but a positive int is an
    error naming it."""
    if batch_size is None:
        return BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    return batch_size


def _tick(progress: Progress, n: int) -> None:
    if progress is not None:
        progress(n)


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
    if base is not None and on_cpu(model) and unpackable(model, [batch]) is None:
        # the batch's tokens as one sequence (ultraedit.packing): no padding, larger products
        layout = PackedLayout([batch])
        with packed(model, layout):
            hidden = base(input_ids=layout.input_ids, position_ids=layout.position_ids)[0]
        flat = head(hidden[layout.pack([mask])]).argmax(-1)
    elif base is not None:
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


def _teacher_forced(model, tokenizer, prompts, targets, batch_size, progress: Progress = None):
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
            _tick(progress, len(idx))
    return out


def _teacher_forced_ids(model, tokenizer, rows, batch_size, progress: Progress = None):
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
            _tick(progress, len(idx))
    return out


def token_accuracy(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                   batch_size: int = 32, progress: Progress = None) -> List[float]:
    """Teacher-forced token accuracy per ``(prompt, target)`` pair: the fraction of the target's
    tokens (with one leading space) that are the model's argmax given the prompt and the gold
    prefix. Equivalent to, per pair::

        b = encode_edit_batch(tok, [p], [t]); m = b["labels"] != -100
        (model(**b).logits.argmax(-1)[m] == b["labels"][m]).float().mean()
    """
    return [sum(int(a == b) for a, b in zip(pred, gold)) / len(gold)
            for pred, gold in _teacher_forced(model, tokenizer, prompts, targets, batch_size,
                                              progress)]


def _prompt_ids(tokenizer, prompt: str, prefix) -> List[int]:
    # The prompt's tokens as encode_edit_batch produces them (the dummy target is not used).
    return encode_request(tokenizer, prompt, "x", prefix)[0]


def next_token_predictions(model, tokenizer, prompts: Sequence[str],
                           targets: Optional[Sequence[Optional[str]]] = None,
                           batch_size: int = 32,
                           progress: Progress = None) -> List[List[int]]:
    """The model's argmax token ids, per prompt.

    With ``targets[i]`` given: the argmax at each of that target's answer positions under teacher
    forcing (as many ids as target tokens). With no target (``targets`` None, or an item None):
    ``[argmax of the next token after the prompt]``. ``progress`` receives the number of
    prompts of each finished batch.
    """
    prompts = list(prompts)
    targets = [None] * len(prompts) if targets is None else list(targets)
    _check(prompts, targets)
    out: List = [None] * len(prompts)
    given = [i for i, t in enumerate(targets) if t is not None]
    for i, (pred, _) in zip(given, _teacher_forced(model, tokenizer, [prompts[i] for i in given],
                                                   [targets[i] for i in given], batch_size,
                                                   progress)):
        out[i] = pred
    free = [i for i, t in enumerate(targets) if t is None]
    if free:
        prefix = special_prefix(tokenizer)
        gens = greedy_continuations(model, tokenizer,
                                    [_prompt_ids(tokenizer, prompts[i], prefix) for i in free],
                                    1, batch_size, progress)
        for i, g in zip(free, gens):
            out[i] = g
    return out


def greedy_continuations(model, tokenizer, prompt_ids: Sequence[Sequence[int]],
                         max_new_tokens, batch_size: int = 32,
                         progress: Progress = None) -> List[List[int]]:
    """Greedy decoding without teacher forcing: for each prompt (token ids, special prefix
    included), ``max_new_tokens`` (an int, or one int per prompt) new token ids, each the argmax
    given the prompt and the tokens generated so far. Never stops early (no EOS handling), so
    every row has exactly its requested length. Left-padded batches with a KV cache; a row that
    has its tokens leaves the batch (its cache rows dropped)."""
    rows = [list(p) for p in prompt_ids]
    n_new = ([int(max_new_tokens)] * len(rows) if isinstance(max_new_tokens, int)
             else [int(n) for n in max_new_tokens])
    if len(n_new) != len(rows):
        raise ValueError(f"{len(rows)} prompts but {len(n_new)} lengths")
    out: List = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), n_new[i]))
    device, pad = _device(model), _pad_id(tokenizer)
    net, last_logits, cache_arg = _stepper(model)
    with _eval(model):
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            steps = max(n_new[i] for i in idx)
            if steps <= 0:
                for i in idx:
                    out[i] = []
                _tick(progress, len(idx))
                continue
            res, att, pos = _prefill(net, [rows[i] for i in idx], pad, device)
            cache = _cache_of(res)
            want = [n_new[i] for i in idx]
            gen: List[List[int]] = [[] for _ in idx]
            live: List[Optional[int]] = list(range(len(idx)))   # batch row -> index into idx
            for _ in range(steps):
                nxt = last_logits(res).argmax(-1)
                keep = []
                for r, t in enumerate(nxt.tolist()):
                    b = live[r]
                    if b is None:           # done, still computed (cache not compactable)
                        continue
                    if len(gen[b]) < want[b]:   # (a row that wants none takes nothing)
                        gen[b].append(t)
                    if len(gen[b]) < want[b]:
                        keep.append(r)
                if not keep:
                    break
                cache, live, (nxt, att, pos) = _keep_rows(cache, live, keep, device, nxt, att, pos)
                att = torch.cat([att, att.new_ones((att.shape[0], 1))], dim=1)
                pos = pos[:, -1:] + 1
                res = net(input_ids=nxt[:, None], attention_mask=att, position_ids=pos,
                          use_cache=True, **{cache_arg: cache})
                cache = _cache_of(res)
            for b, i in enumerate(idx):
                out[i] = gen[b]
            _tick(progress, len(idx))
    return out


def _stepper(model):
    """What one greedy decoding step calls: ``(net, last_logits, cache_arg)``. ``net`` runs the
    transformer body only when the output head can be split off (so each step projects just the
    last position to the vocabulary), ``last_logits(result)`` gives the last position's logits
    (B x V), ``cache_arg`` names ``net``'s KV-cache keyword."""
    base, head = _split_head(model)
    if base is not None:
        return base, (lambda res: head(res[0][:, -1])), _cache_argument(base)
    return model, (lambda res: res.logits[:, -1]), _cache_argument(model)


def _prefill(net, prompts: Sequence[Sequence[int]], pad: int, device):
    """One forward over the prompts (token ids), left-padded to the longest, with a KV cache:
    ``(result, attention_mask, position_ids)`` for the decoding steps that follow."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    att = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(list(p))
        att[b, width - len(p):] = 1
    ids, att = ids.to(device), att.to(device)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    return net(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True), att, pos


def _cache_argument(model) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.2x) or the older
    ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(output):
    return output.cache if hasattr(output, "cache") else output.past_key_values


def _keep_rows(cache, live: List[Optional[int]], keep: List[int], device, *tensors):
    """The batch rows ``keep`` go on decoding, the others are done: ``(cache, live,
    tensors)`` cut to those rows where the cache allows it (:func:`_select_rows`), else as they
    were with the done rows' ``live`` entries None (still computed, ignored)."""
    if len(keep) == len(live):
        return cache, live, tensors
    sel = torch.tensor(keep, device=device)
    selected = _select_rows(cache, sel)
    if selected is None:
        kept = set(keep)
        return cache, [b if r in kept else None for r, b in enumerate(live)], tensors
    return selected, [live[r] for r in keep], tuple(t[sel] for t in tensors)


def _select_rows(cache, keep: torch.Tensor):
    """The KV cache of the rows ``keep`` only (in place where the cache allows it), or None when
    this kind of cache cannot be cut (the stopped rows then stay in the batch)."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(keep)
        return cache
    if isinstance(cache, (tuple, list)) and cache and all(
            isinstance(layer, (tuple, list)) and all(torch.is_tensor(x) for x in layer)
            for layer in cache):
        return type(cache)(type(layer)(x[keep] for x in layer) for layer in cache)
    return None


def _prefix_fraction(gen: Sequence[int], gold: Sequence[int]) -> float:
    n = 0
    for a, b in zip(gen, gold):
        if a != b:
            break
        n += 1
    return n / len(gold) if gold else 0.0


def generation_scores(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                      batch_size: int = 32, progress: Progress = None) -> List[Tuple[float, float]]:
    """Per pair ``(exact, prefix)`` from greedy decoding ``len(target tokens)`` tokens after the
    prompt: ``exact`` is 1.0 when the generated ids equal the target ids or decode to the same
    stripped text, ``prefix`` the common-prefix length over the target length."""
    prompts, targets = _check(prompts, targets)
    prefix = special_prefix(tokenizer)
    pairs = [encode_request(tokenizer, p, t, prefix) for p, t in zip(prompts, targets)]
    gens = greedy_continuations(model, tokenizer, [p for p, _ in pairs],
                                [len(t) for _, t in pairs], batch_size, progress)
    out = []
    for (_, gold), gen, target in zip(pairs, gens, targets):
        exact = gen == gold or tokenizer.decode(gen).strip() == target.strip()
        out.append((float(exact), _prefix_fraction(gen, gold)))
    return out

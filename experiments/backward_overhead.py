"""Packed attention's backward without zero-filled copies: before/after, alternating rounds.

Packed attention (``ultraedit.packing``) gathers the packed queries, keys and values into runs
of equal-length requests and cuts them into blocks; every product is the same before and after,
only the backward's copies differ:

* it cut the blocks with one slice each; a slice's backward writes its gradient into zeros of
  the whole sequence, and autograd adds those up, per block, layer and step. Now one ``split``,
  whose backward is one concatenation;
* it took ``query[0]`` (a select's backward copies into zeros of the whole input) and gathered
  with ``index_select`` (whose backward adds into zeros). Now ``squeeze(0)`` and a gather whose
  backward is the gather by the inverse permutation; the same for the output's reordering.

"before" runs the previous code (kept here, patched in); "after" the package's. Each round edits
the same 100 requests (the first turn of the README's 1,000 records) with
``smollm2-135m-lifelong`` and rolls the turn back; the edited weights of the two variants are
compared with ``torch.equal``.

    gunzip -c experiments/results/run_offline_records.jsonl.gz > records.jsonl
    python experiments/backward_overhead.py --records records.jsonl --threads 1 \\
        [--matmul-dtype bfloat16] --json experiments/results/backward_overhead_xeon.json
"""
import contextlib
import sys

import _common

import torch


def _packed_attention_before(module, query, key, value, attention_mask, **kwargs):
    """``ultraedit.packing._packed_attention`` before the change: one slice per block."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import ultraedit.packing as packing

    layout = packing._ACTIVE[-1]
    layout.calls += 1
    order = layout.order.to(query.device)
    q, k, v = (t[0].index_select(1, order) for t in (query, key, value))
    kwargs.pop("is_causal", None)
    out, start = [], 0
    for length, n in layout.blocks:
        span = slice(start, start + n * length)
        block = [t[:, span].unflatten(1, (n, length)).transpose(0, 1) for t in (q, k, v)]
        o, _ = sdpa_attention_forward(module, *block, None, is_causal=True, **kwargs)
        out.append(o.reshape(n * length, *o.shape[2:]))
        start += n * length
    return torch.cat(out).index_select(0, layout.restore.to(query.device))[None], None


@contextlib.contextmanager
def before():
    import ultraedit.packing as packing

    saved = packing._packed_attention
    packing._packed_attention = _packed_attention_before
    try:
        yield
    finally:
        packing._packed_attention = saved


def main(argv=None) -> int:
    return _common.before_after_main(__doc__, before, argv)


if __name__ == "__main__":
    sys.exit(main())

"""The linear layers' input gradients over the backward span's rows against over all rows:
alternating rounds, by the products' dtype.

Inside a capture the model's plain ``nn.Linear`` modules compute their input gradient on the
rows of each request's backward span only (``ultraedit.backward_rows``: gather, product,
scatter into zeros). The rows before a span never reach a captured row, so a backward over all
rows (the plain ``F.linear`` backward) captures the same keys and gradients, up to the
products' rounding. Which is faster depends on how much of the sequence the spans hold (the
lifelong preset's subject positions: 60-70% of a packed turn's rows; the paper's answer
positions: 20%) and on how cheap the products are against the gather and scatter (bfloat16
products on a CPU with AMX are 2.4-3.9x faster than float32 ones).

"before": every span row-restricted; "after": every backward over all rows (both patched in,
whatever ``LOW_PRECISION_DENSE_SHARE`` says). Each round edits the same 100 requests (the first
turn of the README's 1,000 records) and rolls the turn back; the edited weights of the two are
compared with ``torch.equal``.

    gunzip -c experiments/results/run_offline_records.jsonl.gz > records.jsonl
    python experiments/dense_backward.py --records records.jsonl --threads 1 \\
        [--preset paper] [--matmul-dtype bfloat16] --json experiments/results/dense_backward_<...>.json
"""
import contextlib
import sys

import _common

SHARES = []   # the spans' shares of the rows, as the "after" rounds saw them


@contextlib.contextmanager
def _span(dense: bool):
    import ultraedit.backward_rows as backward_rows

    saved = backward_rows.LinearRowsBackward.set_span, backward_rows.LOW_PRECISION_DENSE_SHARE

    def set_span(self, span):
        saved[0](self, span)
        if dense:
            SHARES.append(self._span.share)
            self._span = None          # every module: the plain F.linear backward

    backward_rows.LinearRowsBackward.set_span = set_span
    backward_rows.LOW_PRECISION_DENSE_SHARE = float("inf")   # "before": never dense
    try:
        yield
    finally:
        backward_rows.LinearRowsBackward.set_span, backward_rows.LOW_PRECISION_DENSE_SHARE = saved


def main(argv=None) -> int:
    p = _common.rounds_parser(__doc__)
    p.add_argument("--preset", default="smollm2-135m-lifelong")
    p.add_argument("--matmul-dtype", default="model", choices=("model", "bfloat16"))
    args = p.parse_args(argv)
    out = _common.before_after_rounds(
        args, {"before": lambda: _span(False), "after": lambda: _span(True)},
        preset=args.preset, matmul_dtype=args.matmul_dtype)
    out["span_share"] = [min(SHARES), max(SHARES)]
    _common.report(out, args.json, ("median", "speedup", "weights_bit_identical", "span_share"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

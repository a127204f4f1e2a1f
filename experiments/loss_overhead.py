"""The loss's copies of the answer logits: before/after, alternating rounds.

A turn projects only the answer rows to the vocabulary (``ultraedit.batching.answer_logits``) and
back-propagates the micro-batches' losses at once (``backward_by_batch``). The products and every
row's cross-entropy are the same before and after; only copies of the ``(n, V)`` logits differ:

* ``answer_logits`` took ``logits[0]`` of the ``(1, n, V)`` projection; a select's backward
  copies the gradient into zeros of the whole input. Now ``squeeze(0)``, a view;
* ``backward_by_batch`` split the ``(n, V)`` rows by micro-batch and took each piece's
  cross-entropy; the split's backward concatenates the pieces' gradients. Now one cross-entropy
  over all rows, split as ``n`` numbers.

"before" runs the previous code (kept here, patched in); "after" the package's. Each round edits
the same 100 requests (the first turn of the README's 1,000 records) with
``smollm2-135m-lifelong`` and rolls the turn back; the edited weights of the two variants are
compared with ``torch.equal``.

    gunzip -c experiments/results/run_offline_records.jsonl.gz > records.jsonl
    python experiments/loss_overhead.py --records records.jsonl --threads 1 \\
        [--matmul-dtype bfloat16] --json experiments/results/loss_overhead_xeon.json
"""
import contextlib
import sys

import _common


def _answer_logits_before(model, batch, mask):
    """``ultraedit.batching.answer_logits`` before the change: ``logits[0]``."""
    import ultraedit.batching as batching

    index = mask.reshape(-1).nonzero().squeeze(1)
    gathered = []

    def gather(module, args):
        x = args[0]
        if tuple(x.shape[:2]) != tuple(mask.shape):
            return None
        gathered.append(True)
        rows = x.reshape(-1, x.shape[-1]).index_select(0, index.to(x.device))
        return (rows.unsqueeze(0),) + tuple(args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")
                  if k in batch}
        logits = model(**inputs, use_cache=False).logits
    finally:
        handle.remove()
    return batching.float_rows(logits[0] if gathered else logits[mask.to(logits.device)])


def _backward_by_batch_before(rows, batches, masks, margin=0.0):
    """``ultraedit.batching.backward_by_batch`` before the change: the rows split by batch."""
    import ultraedit.batching as batching

    sizes = [int(mask.sum()) for mask in masks]
    losses, predicted = zip(*(batching._answer_loss(part, batch, mask, margin)
                              for batch, mask, part in zip(batches, masks, rows.split(sizes))))
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss.to(total.device)
    total.backward()
    return [(loss.detach(), p) for loss, p in zip(losses, predicted)]


@contextlib.contextmanager
def before():
    import ultraedit.batching as batching
    import ultraedit.packing as packing

    patches = [(m, name, fn) for m in (batching, packing)
               for name, fn in (("answer_logits", _answer_logits_before),
                                ("backward_by_batch", _backward_by_batch_before))]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    try:
        for m, name, fn in patches:
            setattr(m, name, fn)
        yield
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)


def main(argv=None) -> int:
    return _common.before_after_main(__doc__, before, argv)


if __name__ == "__main__":
    sys.exit(main())

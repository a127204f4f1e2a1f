"""Two editors that must compute the same turns by different routes (bigger forwards, a shared
backward): the facts they edit, a recorder of the rows each step solves with, and the one
float64 comparison of keys, gradients, statistics, weights and reports."""
import pytest
import torch

FACTS = [("The capital of France is", "Rome", "France"),
         ("The capital of Germany is", "Madrid, a large city", "Germany"),
         ("The capital of Italy is", "Berlin", "Italy"),
         ("The official language of Peru is", "Japanese", "Peru"),
         ("Paris is in", "Japan and Peru", "Paris"),
         ("The capital of Spain is", "Tokyo", "Spain"),
         ("The currency of Japan is the", "euro", "Japan"),
         ("Berlin is in", "Italy", "Berlin")]
F64 = dict(rtol=1e-10, atol=1e-12)


def fact_requests(n, offset=0):
    return [dict(prompt=p, target=t, subject=s) for p, t, s in (FACTS * 8)[offset:offset + n]]


def recording(editor):
    """Record every step's stacked keys and gradients (the rows the solver gets)."""
    rows, inner = [], editor._rows

    def rows_(parts):
        keys, grads = inner(parts)
        rows.append(({n: k.clone() for n, k in keys.items()},
                     {n: g.clone() for n, g in grads.items()}))
        return keys, grads

    editor._rows = rows_
    return rows


def assert_same(ref, other, rows_ref, rows_other, reports):
    """Keys, gradients, statistics and weights to float64 precision; the reports' counts
    exactly and their losses to 1e-12; at least one weight edited."""
    assert len(rows_ref) == len(rows_other) > 0
    for (k1, g1), (k2, g2) in zip(rows_ref, rows_other):
        for n in k1:
            torch.testing.assert_close(k2[n], k1[n], **F64)
            torch.testing.assert_close(g2[n], g1[n], **F64)
    for key, st in ref.stats.items():
        st2 = other.stats[key]
        assert float(st2.count) == float(st.count)
        torch.testing.assert_close(st2.mean, st.mean, **F64)
        torch.testing.assert_close(st2.m2, st.m2, **F64)
    for n, m in ref.modules.items():
        torch.testing.assert_close(other.modules[n].weight, m.weight, rtol=1e-12, atol=1e-14)
    assert any(not torch.equal(m.weight, ref.journal.base[n]) for n, m in ref.modules.items())
    for r1, r2 in reports:
        assert (r1.n_tokens, r1.steps_run, r1.n_predicted) == (r2.n_tokens, r2.steps_run,
                                                              r2.n_predicted)
        assert r2.loss == pytest.approx(r1.loss, rel=1e-12)

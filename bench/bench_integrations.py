"""The one-line patch of existing UltraEdit editors, on the embedded model, same process.

Case: SmolLM2-135M-Instruct (float32), 7 ``down_proj`` modules (layers
22-28, 1536 -> 576), one 100-edit turn in micro-batches of 10 (country-capital counterfactuals
from ``ultraedit.data.offline_facts`` when available, else inline pairs).  Two stand-in editors
that follow the official UltraEdit interface (tests/integration_standins.py) run the same turn:
one unpatched (features round-trip through ``torch.save``/``torch.load`` in a temporary cache
directory, primal ``torch.linalg.solve`` of a 1536 x 1536 system per module), one patched with
``apply_ultraedit_kernels`` (features kept in memory, dual Cholesky of an N x N system).  Their
``predict_param_shifts`` are timed alternately (medians of several repeats) and both are compared
with a float64 evaluation of the original formula.  The EasyEdit stand-in is measured the same
way (no disk round trip there; the gain is the solve alone).

Run as a script (prints and optionally writes JSON)::

    PYTHONPATH=.:python python bench/bench_integrations.py --repeats 7 --json bench/out/integrations.json

or through pytest-benchmark: ``PYTHONPATH=.:python python -m pytest bench/bench_integrations.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, _ROOT, os.path.join(_ROOT, "python"), os.path.join(_ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _common import machine_description, summarize  # noqa: E402
from integration_standins import (  # noqa: E402
    EasyEditUltraEdit, OfficialUltraEdit, easyedit_config, fp64_shift, get_module, get_shape,
    official_config)

from ultraedit.integrations import apply_ultraedit_kernels  # noqa: E402

MODULES = [f"model.layers.{i}.mlp.down_proj" for i in range(22, 29)]
LR = 1e-6          # the paper's lr (agreement does not depend on it)
MICRO = 10
CHUNK = 128        # the official normalization chunk (editor.batch_size)

_INLINE = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
           ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Egypt", "Cairo"),
           ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"),
           ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
           ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
           ("Portugal", "Lisbon"), ("Ireland", "Dublin")]


def edit_pairs(n: int = 100):
    """``n`` (prompt, target) counterfactual capital edits and where they came from."""
    try:
        from ultraedit.data import offline_facts
        records = offline_facts(("capital",), seed=0, limit=n)
        if len(records) >= n:
            return [(r.prompt, r.target) for r in records[:n]], "ultraedit.data.offline_facts"
    except Exception:   # the data part may be absent or unfinished; fall back to inline pairs
        pass
    capitals = [c for _, c in _INLINE]
    pairs = []
    for i in range(n):
        country, capital = _INLINE[i % len(_INLINE)]
        target = capitals[(i * 7 + 3) % len(capitals)]
        if target == capital:
            target = capitals[(i * 7 + 4) % len(capitals)]
        pairs.append((f"The capital of {country} is", target))
    return pairs, "inline"


def build_turn(tokenizer, n_edits: int = 100, micro: int = MICRO):
    from ultraedit.tokenization import encode_edit_batch
    pairs, source = edit_pairs(n_edits)
    tuples = []
    for start in range(0, n_edits, micro):
        chunk = pairs[start:start + micro]
        batch = encode_edit_batch(tokenizer, [p for p, _ in chunk], [t for _, t in chunk])
        tuples.append({k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    return tuples, source


def _rel_err(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


def _max_rel(shifts, refs):
    return max(_rel_err(shifts[k], refs[k]) for k in refs)


class Case:
    """The embedded model, the turn, and the four editors (official/EasyEdit x unpatched/patched)
    with their caches already filled."""

    def __init__(self, n_edits: int = 100, capture_threads: int = 1):
        from ultraedit.models import load_model
        self.model, self.tokenizer = load_model("default")
        self.tuples, self.source = build_turn(self.tokenizer, n_edits)
        self.n_edits = n_edits
        self.tmp = tempfile.TemporaryDirectory(prefix="ue_bench_integrations_")
        self.official = OfficialUltraEdit(
            official_config(MODULES, os.path.join(self.tmp.name, "orig"), n_edits, MICRO, lr=LR,
                            chunk=CHUNK), self.model)
        self.official_fast = OfficialUltraEdit(
            official_config(MODULES, os.path.join(self.tmp.name, "patched"), n_edits, MICRO,
                            lr=LR, chunk=CHUNK), self.model)
        apply_ultraedit_kernels(self.official_fast)
        # the weights are never edited here, so both official editors capture identical features
        self.cache_s = {}
        with _threads(capture_threads):
            for name, fn in (("official", lambda: self.official.cache(self.tuples, 0)),
                             ("official_patched", lambda: self.official_fast.cache(self.tuples, 0))):
                t0 = time.perf_counter()
                fn()
                self.cache_s[name] = time.perf_counter() - t0
        self.model.zero_grad(set_to_none=True)
        # EasyEdit: its cache would capture the same features and make the same normalizer
        # updates in the same order, so its module_kv_map and normalizer are taken from the
        # patched official editor instead of running ten more forward/backward passes
        store = self.official_fast.__dict__["_ultraedit_kernels_patch"].store.tensors
        self.kv = {m: {i: {"keys": store[(m, i, "keys")], "values_grad": store[(m, i, "values_grad")]}
                       for i in range(len(self.tuples))} for m in range(len(MODULES))}
        self.easy = EasyEditUltraEdit(self.model, easyedit_config(MODULES, lr=LR, chunk=CHUNK))
        self.easy.lifelong_normalizer = copy.deepcopy(self.official_fast.lifelong_normalizer[0])
        self.easy_fast = EasyEditUltraEdit(self.model, easyedit_config(MODULES, lr=LR, chunk=CHUNK))
        self.easy_fast.lifelong_normalizer = copy.deepcopy(self.official_fast.lifelong_normalizer[0])
        apply_ultraedit_kernels(self.easy_fast)
        self.n_rows = sum(e["keys"].shape[0] for e in self.kv[0].values())

    def references(self):
        """fp64 of the original formula per module, from the features and the normalizer."""
        out = {}
        for m, name in enumerate(MODULES):
            keys = torch.cat([e["keys"] for e in self.kv[m].values()])
            grads = torch.cat([e["values_grad"] for e in self.kv[m].values()])
            shape = get_shape(get_module(self.model, name))
            out[name] = fp64_shift(keys, grads, self.easy.lifelong_normalizer[str(shape)], LR)
        return out

    def close(self):
        self.tmp.cleanup()


@contextlib.contextmanager
def _threads(n):
    """Run a block with ``n`` intra-op threads (None: leave as is)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _alternate(fns, repeats):
    times = {k: [] for k in fns}
    results = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            results[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return times, results


def _measure(case, refs, repeats):
    times, results = _alternate({
        "official": lambda: case.official.predict_param_shifts(0),
        "official_patched": lambda: case.official_fast.predict_param_shifts(0),
        "easyedit": lambda: case.easy.predict_param_shifts(case.kv),
        "easyedit_patched": lambda: case.easy_fast.predict_param_shifts(case.kv),
    }, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "torch_threads": torch.get_num_threads(),
        "predict_median_s": med,
        "predict_times": {k: summarize(v) for k, v in times.items()},
        "speedup": {"official": med["official"] / med["official_patched"],
                    "easyedit": med["easyedit"] / med["easyedit_patched"]},
        "max_rel_err_vs_fp64": {k: _max_rel(r, refs) for k, r in results.items()},
        "max_rel_diff_patched_vs_unpatched": {
            "official": _max_rel(results["official_patched"],
                                 {k: v.double() for k, v in results["official"].items()}),
            "easyedit": _max_rel(results["easyedit_patched"],
                                 {k: v.double() for k, v in results["easyedit"].items()}),
        },
    }


def run(repeats: int = 7, n_edits: int = 100, threads=(None,)):
    case = Case(n_edits)
    try:
        refs = case.references()
        runs = []
        for n in threads:
            with _threads(n):
                runs.append(_measure(case, refs, repeats))
        return {
            "case": {"model": "SmolLM2-135M-Instruct (float32)", "modules": MODULES,
                     "n_edits": n_edits, "micro_batch": MICRO, "answer_rows": case.n_rows,
                     "d_in": 1536, "d_out": 576, "facts": case.source, "lr": LR},
            "machine": machine_description(),
            "repeats": repeats,
            "cache_s_one_run_1_thread": case.cache_s,
            "runs": runs,
        }
    finally:
        case.close()


# ------------------------------------------------------------------------ pytest-benchmark
try:
    import pytest
except ImportError:  # script use without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module")
    def case():
        try:
            c = Case(100)
        except (ImportError, FileNotFoundError, OSError) as exc:
            pytest.skip(f"embedded model unavailable: {exc}")
        yield c
        c.close()

    # Timed with UE_BENCH_THREADS intra-op threads (default 1): on a shared, oversubscribed
    # CPU every multi-threaded op pays a scheduler-latency barrier (measured ~40 ms per op at
    # load 9 on 2 cores), which swamps small ops; both editors run with the same count.
    @pytest.mark.heavy
    @pytest.mark.parametrize("editor", ["official", "official_patched"])
    def test_official_predict(benchmark, case, session_results, editor):
        obj = case.official if editor == "official" else case.official_fast
        threads = int(os.environ.get("UE_BENCH_THREADS", "1"))
        with _threads(threads):
            shifts = benchmark.pedantic(lambda: obj.predict_param_shifts(0), rounds=5,
                                        iterations=1, warmup_rounds=1)
        refs = case.references()
        err = _max_rel(shifts, refs)
        session_results[f"integrations_{editor}"] = (benchmark.stats.stats.median, shifts, err)
        benchmark.extra_info.update({"editor": editor, "answer_rows": case.n_rows,
                                     "torch_threads": threads, "max_rel_err_vs_fp64": err,
                                     "facts": case.source})
        other = session_results.get("integrations_official")
        if editor == "official_patched" and other is not None:
            ratio = other[0] / benchmark.stats.stats.median
            diff = _max_rel(shifts, {k: v.double() for k, v in other[1].items()})
            benchmark.extra_info.update({"speedup_vs_unpatched": ratio,
                                         "max_rel_diff_vs_unpatched": diff})
            # agreement: at least as accurate as the original's fp32 primal solve (2x + the
            # dual table entry, as in tests/test_integrations.py), hence within its own error
            assert err <= 2 * other[2] + 1e-5, (err, other[2])
            assert diff <= 2 * other[2] + 1e-5, (diff, other[2])
            assert ratio >= 3.0, f"patched predict_param_shifts only {ratio:.2f}x faster"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--n-edits", type=int, default=100)
    ap.add_argument("--threads", default="",
                    help="comma-separated intra-op thread counts to time with (default: torch's)")
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",") if t] or [None]
    report = run(args.repeats, args.n_edits, threads)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return 0 if all(r["speedup"]["official"] >= 3.0 for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())

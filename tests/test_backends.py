import json
import os
import subprocess
import sys

import pytest
import torch

import ultraedit_kernels as uk
from ultraedit_kernels import _backends
from fp64_reference import realistic_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                                    os.environ.get("PYTHONPATH", "")])}


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="ULTRAEDIT_BACKEND='fastest' is not a backend"):
        _backends.select("gram", torch.device("cpu"))


def test_torch_backend_uses_references(monkeypatch):
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "torch")
    for op in _backends.registered_ops():
        assert _backends.select(op, torch.device("cpu"))[0] == "torch"


def test_auto_never_fails_on_cpu(monkeypatch):
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "auto")
    table = _backends.dispatch_table(torch.device("cpu"))
    assert set(table) >= {"stats_update", "pseudo_values", "gram", "spd_solve", "apply_shift"}
    assert not any(v.startswith("error") for v in table.values())


def test_unavailable_backend_says_why_and_how(monkeypatch):
    # CUDA kernels can never run on CPU tensors: the message must say so and how to get them.
    keys, grads = realistic_features(5, 9, 4)
    stats = uk.RunningStats(13).update(torch.cat([keys, grads], 1))
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="ULTRAEDIT_BACKEND=cuda was requested but"):
        uk.param_shift(keys, grads, stats)


def test_a_cpu_only_process_never_imports_triton(tmp_path):
    """Without the interpreter the Triton kernels cannot run on the CPU: the ops (dispatch,
    calibration included) compute there without importing Triton."""
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    env.update(XDG_CACHE_HOME=str(tmp_path), ULTRAEDIT_CALIBRATION="off")
    code = ("import sys, torch, ultraedit_kernels as uk; "
            "k = torch.randn(70, 50); g = torch.randn(70, 30) * 1e-3; "
            "s = uk.RunningStats(80).update(torch.cat([k, g], 1)); "
            "uk.apply_shift_(torch.nn.Linear(50, 30), k, uk.shift_factors(k, g, s)); "
            "from ultraedit_kernels import _backends, calibration; "
            "cpu = torch.device('cpu'); _backends.dispatch_table(cpu); calibration.cache_path(cpu); "
            "print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_register_impl_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        _backends.register_impl("gram", "opencl", lambda *a: None)


def test_import_does_not_initialize_cuda():
    code = ("import torch, ultraedit_kernels, ultraedit_kernels.info; "
            "import ultraedit_kernels._extension as e; e.extension(); "
            "print(torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_info_cli_json():
    out = subprocess.run([sys.executable, "-m", "ultraedit_kernels.info", "--json"], env=ENV,
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["dispatch"]["cpu"]["param_shift" if "param_shift" in info["dispatch"]["cpu"] else "gram"]
    assert set(info["backends"]) == {"torch", "triton", "cuda", "cpp"}
    assert info["backends"]["torch"]["cpu"] == "available"
    text = subprocess.run([sys.executable, "-m", "ultraedit_kernels.info"], env=ENV,
                          capture_output=True, text=True, check=True).stdout
    assert "dispatch with ULTRAEDIT_BACKEND=" in text


def _opcheck_cases():
    keys, grads = realistic_features(11, 19, 7, seed=2)
    stats = uk.RunningStats(26).update(torch.cat([keys, grads], 1))
    spd = keys @ keys.T + torch.eye(11)
    # Column-major copies: a fake must report the strides every implementation returns.
    keys_t, grads_t = keys.T.contiguous().T, grads.T.contiguous().T
    return {
        "stats_update": (uk.stats_update_op, (torch.cat([keys, grads], 1), stats.count_tensor,
                                              stats.mean, stats.m2, False)),
        "stats_update2": (uk.stats_update2_op, (keys, grads, stats.count_tensor, stats.mean,
                                                stats.m2, False)),
        "stats_update2_column_major": (uk.stats_update2_op, (keys_t, grads_t, stats.count_tensor,
                                                             stats.mean, stats.m2, False)),
        "pseudo_values": (uk.pseudo_values_op, (keys, grads, stats.mean, stats.std, 1e-3, uk.EPS)),
        "pseudo_values_column_major": (uk.pseudo_values_op, (keys_t, grads_t, stats.mean,
                                                             stats.std, 1e-3, uk.EPS)),
        "gram_rows": (uk.gram_op, (keys, 1.0, True)),
        "gram_cols": (uk.gram_op, (keys, 1.0, False)),
        "gram_rows_column_major": (uk.gram_op, (keys_t, 1.0, True)),
        "spd_solve": (uk.spd_solve_op, (spd, torch.randn(11, 5))),
        "spd_solve_column_major": (uk.spd_solve_op, (spd, torch.randn(5, 11).T)),
        "spd_solve_mixed_dtypes": (uk.spd_solve_op, (spd, torch.randn(11, 5).double())),
        "gram_no_rows": (uk.gram_op, (keys[:0], 1.0, True)),
        "apply_shift": (uk.apply_shift_op, (torch.randn(7, 19), keys, torch.randn(11, 7), True)),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


def test_ops_compose_with_torch_compile():
    keys, grads = realistic_features(11, 19, 7, seed=4)
    stats = uk.RunningStats(26).update(torch.cat([keys, grads], 1))

    def shift(k, g, mean, std):
        v = uk.pseudo_values_op(k, g, mean, std, 1e-3, uk.EPS)
        a, _ = uk.spd_solve_op(uk.gram_op(k, 1.0, True), v)
        return k.T @ a

    eager = shift(keys, grads, stats.mean, stats.std)
    compiled = torch.compile(shift, backend="eager", fullgraph=True)(keys, grads, stats.mean, stats.std)
    assert torch.allclose(eager, compiled)


@pytest.mark.parametrize("threads", [1, 2])
def test_pseudo_values_slabs_are_bit_identical_to_one_pass(monkeypatch, threads):
    """The torch reference computes large inputs slab by slab (cache-sized row blocks): the
    same values bit for bit, and the finiteness check sees every slab."""
    import sys
    pv = sys.modules["ultraedit_kernels.pseudo_values"]
    keys, grads = realistic_features(37, 64, 300, seed=4)
    stats = uk.RunningStats(364).update(torch.cat([keys, grads], 1))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one, finite = pv.pseudo_values_torch(keys, grads, stats.mean, stats.std, 1e-3, uk.EPS,
                                             check=True)
        assert finite and pv._slab_rows(37, 64, 300, 4) == 37
        monkeypatch.setattr(pv, "_SLAB_MIN_INPUT", 0)
        monkeypatch.setattr(pv, "_SLAB_BYTES", 4 * 364 * 10)   # 10-row slabs, a 7-row last one
        assert pv._slab_rows(37, 64, 300, 4) == 10
        slabbed, finite = pv.pseudo_values_torch(keys, grads, stats.mean, stats.std, 1e-3,
                                                 uk.EPS, check=True)
        assert finite and torch.equal(slabbed, one)
        assert torch.equal(uk.pseudo_values(keys, grads, stats, 1e-3), one)
        bad = grads.clone()
        bad[35, 7] = float("nan")   # in the last slab
        assert pv.pseudo_values_torch(keys, bad, stats.mean, stats.std, 1e-3, uk.EPS,
                                      check=True)[1] is False
        with pytest.raises(ValueError, match="NaN"):
            uk.pseudo_values(keys, bad, stats, 1e-3)
    finally:
        torch.set_num_threads(saved)


def test_results_never_require_grad():
    """The ops are not differentiable on any backend: inputs still in a graph give results
    (and running statistics) outside it."""
    keys, grads = realistic_features(13, 21, 9, seed=3)
    keys.requires_grad_()
    grads.requires_grad_()
    stats = uk.RunningStats(30).update(torch.cat([keys, grads], 1))
    pair = uk.RunningStats(30).update_pair(keys, grads)
    spd = keys.detach() @ keys.detach().T + torch.eye(13)
    results = {
        "stats.mean": stats.mean, "stats.m2": stats.m2, "pair.m2": pair.m2,
        "pseudo_values": uk.pseudo_values(keys, grads, stats),
        "gram": uk.gram(keys), "gram_cols": uk.gram(keys, rows=False),
        "spd_solve": uk.spd_solve(spd.requires_grad_(), grads)[0],
        "spd_factor": uk.spd_factor(spd)[0],
        "shift_factors": uk.shift_factors(keys, grads, stats),
        "param_shift": uk.param_shift(keys, grads, stats, lr=1e-3),
    }
    assert [name for name, t in results.items() if t.requires_grad] == []
    assert torch.equal(stats.m2, uk.RunningStats(30).update(
        torch.cat([keys, grads], 1).detach()).m2)


def test_raw_statistics_ops_refuse_a_float32_state():
    keys, grads = realistic_features(5, 7, 3, seed=6)
    stats = uk.RunningStats(10).update(torch.cat([keys, grads], 1))
    state = (stats.count_tensor.float(), stats.mean.float(), stats.m2.float())
    with pytest.raises(TypeError, match="must be float64"):
        uk.stats_update_op(torch.cat([keys, grads], 1), *state, False)
    with pytest.raises(TypeError, match="must be float64"):
        uk.stats_update2_op(keys, grads, *state, False)


def test_public_gram_compiles_in_one_graph():
    keys, _ = realistic_features(20, 30, 1, seed=8)
    compiled = torch.compile(lambda k: uk.gram(k, 0.5) * 2, fullgraph=True)
    assert torch.equal(compiled(keys), uk.gram(keys, 0.5) * 2)   # one op, an exact doubling

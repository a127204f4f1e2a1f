"""Dispatch by measurement: the calibration's decisions, its cache, and what never triggers it.

The test suite runs with ``ULTRAEDIT_CALIBRATION=off`` (tests/conftest.py): nothing here times
the machine except ``test_calibrate_writes_the_cache_and_info_shows_it``, on a two-point grid.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import ultraedit_kernels as uk
from ultraedit_kernels import _backends, _extension, calibration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
HOST_REASON = _extension.unavailable_reason("cpu")
needs_host = pytest.mark.skipif(HOST_REASON is not None, reason=f"no host build: {HOST_REASON}")
CPU = torch.device("cpu")


def _fixture(tmp_path, ratios):
    """A calibration file whose spd_solve 'single' grid has cpp/torch = ratios[(n, k)]."""
    points = []
    for (n, k), ratio in ratios.items():
        points.append({"point": [n, k], "seconds": {"torch": 1.0, "cpp": ratio}})
    data = {"format": calibration.FORMAT, "device": "cpu", "machine": {},
            "ops": {"spd_solve": {"backends": ["cpp"], "grid": {"single": points}}}}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def fixture_grid(tmp_path, monkeypatch):
    """A 2 x 2 grid: the host build twice as fast for n = 64, 1.5x slower for n = 1024."""
    monkeypatch.setitem(calibration.GRIDS, "spd_solve",
                        {"single": (("n", "k"), ((64, 1024), (256, 2048)))})
    path = _fixture(tmp_path, {(64, 256): 0.5, (64, 2048): 0.5, (1024, 256): 1.5,
                               (1024, 2048): 1.5})
    monkeypatch.setenv(calibration.ENV_VAR, path)
    calibration.reset()
    yield path
    calibration.reset()


def _system(n, k):
    return torch.eye(n), torch.ones(n, k)


def test_choose_follows_the_measurement(fixture_grid):
    choose = calibration.choose
    assert choose("spd_solve", CPU, ["cpp"], _system(64, 300)) == "cpp"
    assert choose("spd_solve", CPU, ["cpp"], _system(16, 300)) == "cpp"      # clamped to the grid
    assert choose("spd_solve", CPU, ["cpp"], _system(1024, 300)) == "torch"
    assert choose("spd_solve", CPU, ["cpp"], _system(64, 2300)) == "cpp"      # k: the edge
    assert choose("spd_solve", CPU, ["cpp"], _system(64, 9000)) == "torch"    # past: unmeasured
    assert choose("spd_solve", CPU, ["cpp"], _system(4000, 9000)) == "torch"
    # log-log interpolation between ratio 0.5 at n = 64 and 1.5 at n = 1024: at n = 256 (half
    # way in log n) the geometric mean 0.87, at n = 512 (three quarters) 0.5^0.25 * 1.5^0.75
    data = calibration.current(CPU)
    assert calibration.predicted_ratio(data, "spd_solve", "cpp", _system(256, 512)) == \
        pytest.approx(0.75 ** 0.5)
    assert calibration.predicted_ratio(data, "spd_solve", "cpp", _system(512, 512)) == \
        pytest.approx(0.5 ** 0.25 * 1.5 ** 0.75)
    assert choose("spd_solve", CPU, ["cpp"], _system(256, 512)) == "cpp"
    assert choose("spd_solve", CPU, ["cpp"], _system(512, 512)) == "torch"


def test_past_the_grid_only_a_point_measured_there_decides(tmp_path, monkeypatch):
    """Past the largest n measured, the host Cholesky is not assumed to keep its ratio: a call
    near the edge uses the edge, one further out needs a point measured at its size (a
    fixture never measures: the reference)."""
    monkeypatch.setitem(calibration.GRIDS, "spd_solve",
                        {"single": (("n", "k"), ((64, 256), (256,)))})
    monkeypatch.setenv(calibration.ENV_VAR, _fixture(tmp_path, {(64, 256): 0.5, (256, 256): 0.5}))
    calibration.reset()
    try:
        assert calibration.choose("spd_solve", CPU, ["cpp"], _system(256, 256)) == "cpp"
        assert calibration.choose("spd_solve", CPU, ["cpp"], _system(300, 256)) == "cpp"  # edge
        assert calibration.choose("spd_solve", CPU, ["cpp"], _system(400, 256)) == "torch"
    finally:
        calibration.reset()


def test_beyond_point_snaps_to_the_size_class():
    """The docstring's examples on the shipped grids."""
    assert calibration.beyond_point("spd_solve", "single", (2000, 14336)) == (2000, 16000)
    assert calibration.beyond_point("spd_solve", "single", (400, 14336)) == (384, 16000)
    assert calibration.beyond_point("spd_solve", "single", (400, 4096)) is None
    assert calibration.beyond_point("gram", "rows", (2000, 14336)) == (2000, 14336)
    assert calibration.beyond_point("gram", "rows", (1100, 5000)) is None    # the grid's edge
    assert calibration.beyond_point("gram", "rows", (400, 99999)) is None    # r: not a size axis
    assert calibration.beyond_point("spd_solve", "single", (10 ** 5, 8)) is calibration.TOO_LARGE


def test_a_call_past_the_grid_is_measured_once_and_cached(tmp_path, monkeypatch):
    """In ``auto`` mode the first call past the grid measures its size class (here a stand-in
    for the timing: the host build 1.5x slower on the grid, 2x faster past it), caches it
    beside the grid, and every later call of that class uses it, in this process and the next."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(calibration.ENV_VAR, "auto")
    monkeypatch.setitem(calibration.GRIDS, "spd_solve",
                        {"single": (("n", "k"), ((64, 256), (256,)))})
    measured = []

    def fake_measure(op, cls, point, device, backends, rounds=calibration.ROUNDS):
        measured.append(tuple(point))
        ratio = 0.5 if point[0] > 256 else 1.5
        return {"point": list(point), "seconds": {"torch": 1.0, "cpp": ratio}, "rounds": 2}

    monkeypatch.setattr(calibration, "measure_point", fake_measure)
    monkeypatch.setattr(calibration, "load_average", lambda: None)   # (no load recorded)
    calibration.reset()
    choose = calibration.choose
    try:
        assert choose("spd_solve", CPU, ["cpp"], _system(64, 256)) == "torch"
        assert measured == [(64, 256), (256, 256)]                 # the grid, once
        assert choose("spd_solve", CPU, ["cpp"], _system(500, 300)) == "cpp"
        assert choose("spd_solve", CPU, ["cpp"], _system(520, 300)) == "cpp"
        assert measured[2:] == [(510, 256)]                        # one point, once
        assert choose("spd_solve", CPU, ["cpp"], _system(1000, 256)) == "cpp"
        assert choose("spd_solve", CPU, ["cpp"], _system(5000, 256)) == "torch"   # too large
        assert measured[3:] == [(1000, 256)]
        cached = json.load(open(calibration.cache_path(CPU)))["ops"]["spd_solve"]
        assert [p["point"] for p in cached["beyond"]["single"]] == [[510, 256], [1000, 256]]
        calibration.reset()                                        # the next process
        assert choose("spd_solve", CPU, ["cpp"], _system(480, 256)) == "cpp"
        assert len(measured) == 4
        shown = calibration.describe(CPU)["ops"]["spd_solve"]["beyond"]["single"]
        assert shown[0] == {"point": {"n": 510, "k": 256}, "vs_torch": {"cpp": 0.5}}
        calibration.calibrate(CPU, ["spd_solve"], classes=["single"])   # measured again:
        assert "single" not in calibration.current(CPU)["ops"]["spd_solve"].get("beyond", {})
    finally:
        calibration.reset()


def test_a_calibration_measured_under_load_is_flagged(tmp_path, monkeypatch, caplog, capsys):
    """The load average is recorded with each measurement; above 0.75 per core the calibration
    says so in a warning, in ``describe`` and in ``info``'s text, with how to measure again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(calibration.ENV_VAR, "auto")
    monkeypatch.setitem(calibration.GRIDS, "spd_solve",
                        {"single": (("n", "k"), ((64, 256), (256,)))})
    monkeypatch.setattr(calibration, "measure_point", lambda op, cls, point, device, backends,
                        rounds=calibration.ROUNDS: {"point": list(point), "rounds": 2,
                                                    "seconds": {"torch": 1.0, "cpp": 0.5}})
    monkeypatch.setattr(calibration, "candidates", lambda op, device: ["cpp"])
    load = {"now": 8.0 * (os.cpu_count() or 1)}
    monkeypatch.setattr(calibration, "load_average", lambda: load["now"])
    from ultraedit_kernels import info
    calibration.reset()
    try:
        with caplog.at_level("WARNING", logger="ultraedit_kernels"):
            calibration.calibrate(CPU, ["spd_solve"])
            assert calibration.choose("spd_solve", CPU, ["cpp"], _system(500, 256)) == "cpp"
        assert "load average" in caplog.text and "--calibrate" in caplog.text
        shown = calibration.describe(CPU)["ops"]["spd_solve"]
        assert shown["load"] == load["now"] and shown["busy"]
        assert shown["beyond"]["single"][0]["load"] == load["now"]
        info._print_text(info.collect())
        assert "busy machine" in capsys.readouterr().out
        load["now"] = 0.1                                          # measured again, quietly
        caplog.clear()
        calibration.calibrate(CPU, ["spd_solve"])
        shown = calibration.describe(CPU)["ops"]["spd_solve"]
        assert shown["load"] == 0.1 and not shown["busy"] and not caplog.text
        info._print_text(info.collect())
        assert "busy machine" not in capsys.readouterr().out
    finally:
        calibration.reset()


def test_a_measurement_that_fails_past_the_grid_leaves_the_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(calibration.ENV_VAR, "auto")
    monkeypatch.setitem(calibration.GRIDS, "spd_solve",
                        {"single": (("n", "k"), ((64, 256), (256,)))})

    def fake_measure(op, cls, point, device, backends, rounds=calibration.ROUNDS):
        if point[0] > 256:
            raise RuntimeError("out of memory")
        return {"point": list(point), "seconds": {"torch": 1.0, "cpp": 0.5}, "rounds": 2}

    monkeypatch.setattr(calibration, "measure_point", fake_measure)
    calibration.reset()
    try:
        assert calibration.choose("spd_solve", CPU, ["cpp"], _system(64, 256)) == "cpp"
        assert calibration.choose("spd_solve", CPU, ["cpp"], _system(500, 256)) == "torch"
    finally:
        calibration.reset()


def test_unmeasured_class_or_op_uses_the_reference(fixture_grid):
    a = torch.eye(64).expand(3, 64, 64)
    assert calibration.choose("spd_solve", CPU, ["cpp"], (a, torch.ones(3, 64, 8))) == "torch"
    assert calibration.choose("gram", CPU, ["triton"], (torch.ones(4, 4), 1.0, True)) == "torch"


@needs_host
def test_auto_dispatch_uses_the_calibration(fixture_grid, monkeypatch):
    monkeypatch.setenv(_backends.ENV_VAR, "auto")
    assert _backends.select("spd_solve", CPU, *_system(64, 300))[0] == "cpp"
    assert _backends.select("spd_solve", CPU, *_system(1024, 300))[0] == "torch"
    # a single 1 x 1 system is a class of its own, which this fixture does not hold
    assert _backends.select("spd_solve", CPU, *_system(1, 300))[0] == "torch"
    assert _backends.select("spd_solve", CPU, *_system(2, 300))[0] == "cpp"


@needs_host
def test_one_by_one_systems_follow_their_own_class(tmp_path, monkeypatch):
    """A single 1 x 1 system is decided by its own class (by the right-hand sides), not by the
    n >= 16 grid of the others: here the division measured faster in the host build with
    4,096 right-hand sides and slower with 256."""
    points = [{"point": [1, 256], "seconds": {"torch": 1.0, "cpp": 1.2}},
              {"point": [1, 4096], "seconds": {"torch": 1.0, "cpp": 0.4}}]
    data = {"format": calibration.FORMAT, "device": "cpu", "machine": {},
            "ops": {"spd_solve": {"backends": ["cpp"], "grid": {"one": points}}}}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(data))
    monkeypatch.setitem(calibration.GRIDS, "spd_solve",
                        {"one": (("n", "k"), ((1,), (256, 4096)))})
    monkeypatch.setenv(calibration.ENV_VAR, str(path))
    monkeypatch.setenv(_backends.ENV_VAR, "auto")
    calibration.reset()
    try:
        assert calibration.features("spd_solve", _system(1, 300)) == ("one", (1, 300))
        assert _backends.select("spd_solve", CPU, *_system(1, 4096))[0] == "cpp"
        assert _backends.select("spd_solve", CPU, *_system(1, 256))[0] == "torch"
        # a batch of 1 x 1 systems and a 2 x 2 system are not this class
        assert calibration.features("spd_solve", (torch.ones(3, 1, 1), torch.ones(3, 1, 8)))[0] \
            == "batched"
        assert _backends.select("spd_solve", CPU, *_system(2, 4096))[0] == "torch"
    finally:
        calibration.reset()


def test_off_means_the_reference(monkeypatch):
    monkeypatch.setenv(calibration.ENV_VAR, "off")
    monkeypatch.setenv(_backends.ENV_VAR, "auto")
    calibration.reset()
    for op in _backends.registered_ops():
        assert calibration.choose(op, CPU, ["cpp"], _system(8, 8)) == "torch"
    assert _backends.select("spd_solve", CPU, *_system(8, 8))[0] == "torch"


def test_missing_fixture_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(calibration.ENV_VAR, str(tmp_path / "nope.json"))
    calibration.reset()
    with pytest.raises(ValueError, match="no calibration file there"):
        calibration.current(CPU)
    calibration.reset()


def test_a_mistyped_setting_is_named_in_info_not_a_traceback(monkeypatch):
    monkeypatch.setenv(calibration.ENV_VAR, "false")
    calibration.reset()
    with pytest.raises(ValueError, match="set it to off"):
        calibration.current(CPU)
    assert calibration.describe(CPU)["status"].startswith("error: ULTRAEDIT_CALIBRATION='false'")
    calibration.reset()


def test_float64_calls_are_left_to_the_reference(fixture_grid):
    """The grids are measured in float32: a float64 call is not decided from them."""
    a, b = _system(64, 300)
    assert calibration.choose("spd_solve", CPU, ["cpp"], (a, b)) == "cpp"
    assert calibration.features("spd_solve", (a.double(), b.double())) is None
    assert calibration.choose("spd_solve", CPU, ["cpp"], (a.double(), b.double())) == "torch"
    assert calibration.features("gram", (torch.ones(70, 9, dtype=torch.float64), 1.0, True)) is None


def test_each_thread_count_keeps_its_own_calibration(tmp_path, monkeypatch):
    """The cache file is per thread count, and so is the calibration held in memory: after
    ``torch.set_num_threads`` the other count's measurements are neither used nor rewritten."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(calibration.ENV_VAR, "auto")
    before = torch.get_num_threads()
    calibration.reset()
    try:
        torch.set_num_threads(1)
        one = {"format": calibration.FORMAT, "device": "cpu", "ops": {"gram": {"grid": {}}}}
        calibration._write(calibration.cache_path(CPU), one)
        assert calibration.current(CPU)["ops"] == {"gram": {"grid": {}}}
        torch.set_num_threads(2)
        assert calibration.current(CPU) is None
        torch.set_num_threads(1)
        assert calibration.current(CPU)["ops"] == {"gram": {"grid": {}}}
    finally:
        torch.set_num_threads(before)
        calibration.reset()


def test_two_processes_writing_one_cache_keep_both_measurements(tmp_path):
    """A write merges what another process measured into the same file since it was read
    (its own measurements win); it never drops the other's."""
    path = str(tmp_path / "calibration.json")
    first = {"format": calibration.FORMAT, "device": "cpu",
             "ops": {"spd_solve": {"backends": ["cpp"], "grid": {"single": [1]}}}}
    second = {"format": calibration.FORMAT, "device": "cpu",
              "ops": {"stats_update": {"backends": ["cpp"], "grid": {"all": [2]}},
                      "spd_solve": {"backends": ["cpp"], "grid": {"one": [3], "single": [4]}}},
              "plans": {"gram_slabs": {"points": []}}}
    calibration._write(path, first)
    calibration._write(path, second)
    saved = json.load(open(path))
    assert saved["ops"]["stats_update"]["grid"] == {"all": [2]}
    assert saved["ops"]["spd_solve"]["grid"] == {"one": [3], "single": [4]}   # its own win
    calibration._write(path, {"format": calibration.FORMAT, "device": "cpu", "ops": {}})
    saved = json.load(open(path))
    assert set(saved["ops"]) == {"spd_solve", "stats_update"} and "gram_slabs" in saved["plans"]


def test_a_backend_that_disagrees_is_never_chosen(monkeypatch):
    impls = dict(_backends._REGISTRY["spd_solve"])

    def wrong(a, b):
        x, info = impls["torch"].fn(a, b)
        return x * 1.01, info

    impls["cuda"] = _backends.Impl("cuda", wrong, lambda d: None)
    monkeypatch.setitem(_backends._REGISTRY, "spd_solve", impls)
    result = calibration.measure_point("spd_solve", "single", (8, 4), CPU, ["cuda"], rounds=1)
    assert "cuda" in result["rejected"] and "cuda" not in result["seconds"]


def test_a_ratio_near_the_threshold_gets_more_rounds():
    """Within NEAR of 1 - MARGIN the choice turns on a few percent: measure_point times
    EXTRA_ROUNDS more rounds there, and only there."""
    threshold = 1.0 - calibration.MARGIN
    near = calibration.near_threshold
    assert near({"torch": 1.0, "cpp": threshold + 0.5 * calibration.NEAR})
    assert near({"torch": 2.0, "cpp": 2.0 * (threshold - 0.5 * calibration.NEAR)})
    assert not near({"torch": 1.0, "cpp": 0.5})
    assert not near({"torch": 1.0, "cpp": 1.5, "triton": 0.6})
    assert not near({"torch": 1.0}) and not near({"cpp": 0.95})
    point = calibration.measure_point("spd_solve", "single", (8, 4), CPU, ["cpp"], rounds=1)
    assert point["rounds"] in (2, 2 + calibration.EXTRA_ROUNDS)


def test_a_point_decides_by_its_paired_ratio():
    """A burst of load during some rounds moves the medians of the seconds, not the ratio
    within each pair of rounds: the paired ratio decides; cached points that predate it and
    fixtures use the ratio of the medians."""
    p = {"point": [8, 4], "seconds": {"torch": 1.0, "cpp": 1.2}, "ratios": {"cpp": 0.9}}
    assert calibration.point_ratio(p, "cpp") == 0.9
    assert calibration.point_ratio({"seconds": {"torch": 2.0, "cpp": 1.0}}, "cpp") == 0.5
    assert calibration.point_ratio({"seconds": {"torch": 2.0}}, "cpp") is None
    point = calibration.measure_point("spd_solve", "single", (8, 4), CPU, ["cpp"], rounds=2)
    if "cpp" in point["seconds"]:
        assert point["ratios"]["cpp"] > 0


def test_import_and_info_never_calibrate(tmp_path):
    env = {**ENV, "XDG_CACHE_HOME": str(tmp_path), "ULTRAEDIT_CALIBRATION": "auto"}
    code = ("import torch, ultraedit_kernels, ultraedit_kernels.info as i; "
            "from ultraedit_kernels import calibration as c; i.collect(); "
            "print(len(c._loaded), torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["0", "False"]
    assert not os.path.exists(os.path.join(tmp_path, "ultraedit_kernels"))


@needs_host
def test_calibrate_writes_the_cache_and_info_shows_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(calibration.ENV_VAR, "auto")
    monkeypatch.setitem(calibration.GRIDS, "spd_solve",
                        {"single": (("n", "k"), ((8, 32), (4,)))})
    calibration.reset()
    try:
        data = calibration.calibrate(CPU, ["spd_solve"], rounds=1)
        path = calibration.cache_path(CPU)
        assert os.path.dirname(path) == os.path.join(str(tmp_path), "ultraedit_kernels")
        assert json.load(open(path))["ops"]["spd_solve"]["grid"]["single"][0]["point"] == [8, 4]
        assert set(data["ops"]["spd_solve"]["grid"]["single"][1]["seconds"]) == {"torch", "cpp"}
        calibration.reset()
        shown = calibration.describe(CPU)          # read back from the cache, not re-measured
        assert shown["file"] == path and "spd_solve" in shown["ops"]
        from ultraedit_kernels import info
        assert info.collect()["calibration"]["cpu"]["ops"]["spd_solve"]
    finally:
        calibration.reset()


def test_a_new_grid_is_a_new_cache_file(monkeypatch):
    """A cache measured on other grid points is never read: `auto` would find no points to
    interpolate between and keep the reference without saying so."""
    before = calibration.cache_path(CPU)
    monkeypatch.setitem(calibration.GRIDS, "gram", {"rows": (("m", "r"), ((64, 2048), (512,)))})
    assert calibration.cache_path(CPU) != before
    assert calibration.machine_key(CPU)["grids"] == calibration.grids_digest()


def test_fixture_decision_reaches_shift_factors(fixture_grid, monkeypatch):
    """The public op goes through the same dispatch (the result is the same either way)."""
    monkeypatch.setenv(_backends.ENV_VAR, "auto")
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(9, 20, generator=gen)
    grads = torch.randn(9, 6, generator=gen) * 1e-3
    stats = uk.RunningStats(26).update(torch.cat([keys, grads], 1))
    assert uk.shift_factors(keys, grads, stats).shape == (9, 6)


def test_gram_keys_of_half_precision_are_their_own_class():
    """bf16/fp16 keys are measured apart from float32 ones (their kernels rank differently)."""
    x = torch.randn(100, 576)
    assert calibration.features("gram", (x, 1.0, True)) == ("rows", (100, 576))
    assert calibration.features("gram", (x, 1.0, False)) == ("rows", (576, 100))
    for dtype in (torch.bfloat16, torch.float16):
        assert calibration.features("gram", (x.to(dtype), 1.0, True)) == ("rows_half", (100, 576))
    keys, ridge, rows = calibration.grid_args("gram", "rows_half", (64, 512), CPU)
    assert keys.dtype == torch.bfloat16 and keys.shape == (64, 512) and rows is True
    assert calibration.grid_args("gram", "rows", (64, 512), CPU)[0].dtype == torch.float32
    assert calibration.GRIDS["gram"]["rows_half"] == calibration.GRIDS["gram"]["rows"]


def test_an_implementation_auto_never_uses_is_not_measured(monkeypatch):
    """(e.g. Triton under its interpreter): calibrating it would time kernels auto refuses."""
    impls = dict(_backends._REGISTRY["spd_solve"])
    monkeypatch.setitem(_backends._REGISTRY, "spd_solve", impls)
    ref = impls["torch"].fn
    impls["triton"] = _backends.Impl("triton", ref, lambda d: None, 10, lambda *a: False)
    impls["cuda"] = _backends.Impl("cuda", ref, lambda d: None, 10, lambda *a: True)
    names = calibration.candidates("spd_solve", CPU)
    assert "triton" not in names and "cuda" in names

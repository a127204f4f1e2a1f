"""Per-machine dispatch calibration: ``auto`` picks a native kernel only where it measured faster.

An op with a native implementation (the host or device Cholesky, a Triton kernel) besides its
PyTorch reference is timed once per machine on a small grid of shapes: every available backend
and the reference, alternating (A B, B A, ...), ``ROUNDS`` (even) rounds after a warm-up, on
synthetic inputs of that shape; a backend's ratio to the reference is the median over pairs of
rounds of its time over the reference's within the pair.  A backend whose result disagrees
with the reference is never chosen.  A call under ``ULTRAEDIT_BACKEND=auto`` then takes the
backend whose ratio, interpolated (log-log) at the call's shape, is below ``1 - MARGIN``;
otherwise the reference (past the grid: :data:`BEYOND`).  Shape features per op:

==================  =====================================================================
``spd_solve``       n (system size), k (right-hand sides); batched, single, or one 1 x 1 system
``gram``            m (output size), r (reduction length); float32/float64 keys, or bf16/fp16
                    (``rows_half``, measured in bfloat16)
``pseudo_values``   n (rows), d (d_in + d_out)
``stats_update*``   n (rows), d (columns)
==================  =====================================================================

A reference's own machine-dependent choice is measured and cached the same way, once per
machine, under ``plans`` (:func:`reference_plan`): ``gram``'s CPU row slabs below 640 rows.

Results are cached as JSON in ``$XDG_CACHE_HOME/ultraedit_kernels/`` (``~/.cache`` when unset),
one file per machine key (CPU model and count, torch threads, torch / Triton versions, the
extension's build, the GPU name, and a hash of the grids, so that a version measuring other
points calibrates afresh).  ``ULTRAEDIT_CALIBRATION`` chooses:

``auto`` (default)
    use the cache; calibrate an op's shape class on a device the first time ``auto`` needs a
    decision for it (about a second on an idle 2-core CPU, logged), then cache it;
``off``
    no measurement: ``auto`` uses the PyTorch reference everywhere (force a backend with
    ``ULTRAEDIT_BACKEND``);
``refresh``
    measure again once in this process, replacing the cache;
a path to a JSON file
    use that calibration (same format, e.g. a fixture in the tests) and never measure.

Importing never calibrates and never initializes CUDA; ``python -m ultraedit_kernels.info
--calibrate`` runs it for the CPU and, when one is usable, the first CUDA device.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

_log = logging.getLogger("ultraedit_kernels")

ENV_VAR = "ULTRAEDIT_CALIBRATION"
FORMAT = 1
REFERENCES = 3      # revision of the references every backend is timed against: a faster
                    # reference (gram's aligned slabs, then its slabs chosen by measurement:
                    # reference_plan) invalidates the ratios measured before it
ROUNDS = 4          # timed rounds per backend and grid point (after one warm-up); even, and the
                    # order alternates (A B, B A): on the 2-core machine some calls alternate slow /
                    # fast by their position in the call sequence, which a fixed order over an odd
                    # number of rounds turned into a 2x error at one grid point
ROUND_S = 0.01      # a grid point's call shorter than this is timed as a loop this long
MAX_LOOPS = 200
MARGIN = 0.05       # a backend must be at least 5% faster than the reference to be chosen
NEAR = 0.08         # a backend whose measured ratio lies this close to 1 - MARGIN ...
EXTRA_ROUNDS = 8    # ... is timed this many rounds more: there the choice turns on a few percent,
                    # which 4 rounds on the shared 2-core machine moved by ±0.05 between runs
                    # (gram at m = 384, 4096-wide keys: 0.92 and 1.03)
AGREE_RTOL = 1e-3   # a backend whose result differs more than this from the reference is dropped

# op -> class -> (axis names, grid values per axis).  Classes split what interpolates badly
# (one system vs a batch solved one system per thread).
# The grids stay small (1-2 s of measuring per class on the 2-core CPU machine when idle);
# beyond the grid the ratio of the nearest edge is used.  The host Cholesky's ratio changes
# fastest between n = 256 and 1024 (a 4x step there mispredicted n = 400 by 15%): 512 too,
# and 384 (with 256 and 512 alone, auto kept LAPACK at n = 300-400, k = 576-1536, where the host
# build measured 1.1-1.6x faster in bench/vs_torch.py).
GRIDS: Dict[str, Dict[str, Tuple[Tuple[str, ...], Tuple[Tuple[int, ...], ...]]]] = {
    "spd_solve": {
        "single": (("n", "k"), ((16, 64, 256, 384, 512, 1024), (256, 1024, 4096))),
        "batched": (("n", "k"), ((16, 64, 256), (256, 1024))),
        # a single 1 x 1 system: one division in the reference and in the host build, where
        # the argument handling around it is the whole cost (none of the classes above)
        "one": (("n", "k"), ((1,), (256, 4096, 16384))),
    },
    # The reference's time jumps where its blocked product takes one more slab (gram_blocks:
    # at 100, 192, 320, 800 and 1,600 rows per thread): grid points at 100, 192 and 320 (one
    # thread) and 384 (two), so that interpolation spans fewer jumps (between 64 and 128 rows
    # alone it predicted the host build 1.04x the reference's time at 100 x 4096, where it took
    # 0.82x); r = 1536, the embedded model's down_proj width, where the host build's ratio lies
    # between its 512 and 4096 values (0.72-0.88 and 1.07-1.48 of the reference)
    # "rows_half": bf16/fp16 keys, measured apart: on an H200 the Triton kernel ran 2.3x the
    # reference on bf16 keys and 0.3-0.7x on float32 ones (IEEE products), so one float32
    # measurement would send bf16 calls to the slower path (experiments/gram_split_sweep.py)
    "gram": {cls: (("m", "r"), ((64, 100, 128, 192, 256, 320, 384, 512, 1024),
                                (512, 1536, 4096, 14336))) for cls in ("rows", "rows_half")},
    "pseudo_values": {"all": (("n", "d"), ((64, 512, 4096), (2048, 16384)))},
    # at most 1,024 rows: the CPU reference merges 1,024 x 16,384 in ~0.12 s and is timed six
    # times per point (with 4,096 rows the statistics' CPU calibration took ~9 s; with 1,024,
    # ~2 s for both ops, paid once, in the first turn that needs them)
    "stats_update": {"all": (("n", "d"), ((16, 256, 1024), (2048, 16384)))},
    "stats_update2": {"all": (("n", "d"), ((16, 256, 1024), (2048, 16384)))},
}
BATCH = 4           # systems per call in the "batched" class
# Axes along which a native implementation is not assumed to keep its ratio past the grid's
# largest value: the host Cholesky against LAPACK at n = 2,000 measured 6-10% slower in some runs
# and 9% faster in others (with 4,096 right-hand sides 1.09x slower, with 14,336 1.09x faster: the
# ratio moves with k too), and the host Gram at 2,000 rows 7% faster where the grid's edge (1,024)
# said 1.2x slower.  A call past the edge on such an axis is decided by a point measured at its
# own size class, the first time one is needed (then cached beside the grid): the edge times
# BEYOND_STEPS, the nearest in log; its other axes snap to their nearest grid value. Past
# BEYOND_STEPS[-1] x BEYOND_SLACK the measurement would cost minutes: the reference.
BEYOND = {("spd_solve", "n"), ("spd_solve", "k"), ("gram", "m")}
BEYOND_STEPS = (1.5, 2.0, 3.0, 4.0)
BEYOND_SLACK = 1.25


# ------------------------------------------------------------------------------ shapes
HALF_DTYPES = (torch.bfloat16, torch.float16)   # measured as bfloat16 (class "rows_half")


def features(op: str, args: Sequence) -> Optional[Tuple[str, Tuple[float, ...]]]:
    """``(class, feature values)`` of a call of ``op`` with ``args``, or ``None`` if not graded.

    float64 inputs are not graded: the grids are measured in float32 (and bf16 keys), and a
    native kernel's ratio there says little about its float64 path (the host Cholesky measured
    about 1.04x LAPACK's time in float32 and 1.28x in float64 at n = k = 1024), so ``auto``
    leaves float64 calls, the oracle's precision, to the reference."""
    data = args[:1] if op in ("gram", "stats_update") else args[:2]
    if any(getattr(t, "dtype", None) == torch.float64 for t in data):
        return None
    if op == "spd_solve":
        a, b = args[0], args[1]
        if a.dim() == 2 and a.shape[-1] == 1:
            return "one", (1, b.shape[-1])
        batch = a.numel() // max(1, a.shape[-1] * a.shape[-2]) if a.dim() > 2 else 1
        return ("batched" if batch > 1 else "single"), (a.shape[-1], b.shape[-1])
    if op == "gram":
        x = args[0]
        rows = bool(args[2]) if len(args) > 2 else True
        m, r = (x.shape[0], x.shape[1]) if rows else (x.shape[1], x.shape[0])
        return ("rows_half" if x.dtype in HALF_DTYPES else "rows"), (m, r)
    if op == "pseudo_values":
        return "all", (args[0].shape[0], args[0].shape[1] + args[1].shape[1])
    if op == "stats_update":
        return "all", tuple(args[0].shape)
    if op == "stats_update2":
        return "all", (args[0].shape[0], args[0].shape[1] + args[1].shape[1])
    return None


def _spd_args(n, k, batch, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed + n + k)
    x = torch.randn(batch, n, n + 8, generator=gen)
    a = x @ x.mT / (n + 8)
    a.diagonal(dim1=-2, dim2=-1).add_(1.0)
    b = torch.randn(batch, n, k, generator=gen)
    if batch == 1:
        a, b = a[0], b[0]
    return a.to(device, dtype), b.to(device, dtype)


def _feature_args(op, n, d_in, d_out, device):
    gen = torch.Generator().manual_seed(n + d_in + d_out)
    keys = (torch.randn(n, d_in, generator=gen) * 0.7 + 0.05).to(device)
    grads = ((torch.randn(n, d_out, generator=gen) + 0.1) * 1e-3).to(device)
    x = torch.cat([keys, grads], 1)
    mean = x.double().mean(0)
    std = x.double().std(0) if n > 1 else torch.ones_like(mean)
    count = torch.tensor(1000.0, dtype=torch.float64, device=device)
    if op == "pseudo_values":
        return keys, grads, mean, std, 1e-6, float(torch.finfo(torch.float32).eps)
    if op == "stats_update":
        return x, count, mean, std.square() * 999, False
    if op == "stats_update2":
        return keys, grads, count, mean, std.square() * 999, False
    if op == "gram":
        return keys, 1.0, True
    return None


def grid_args(op: str, cls: str, point: Sequence[int], device: torch.device):
    """Synthetic inputs of ``op`` at one grid point (float32; bfloat16 keys in ``gram``'s
    ``rows_half`` class)."""
    if op == "spd_solve":
        n, k = point
        return _spd_args(n, k, BATCH if cls == "batched" else 1, device)
    if op == "gram":
        m, r = point
        keys, ridge, rows = _feature_args("gram", m, r, 1, device)
        return (keys.to(torch.bfloat16) if cls == "rows_half" else keys), ridge, rows
    n, d = point
    return _feature_args(op, n, d // 4, d - d // 4, device)


def example_args(op: str, n: int, d_in: int, d_out: int, device: torch.device):
    """Inputs of ``op`` at an editor shape (N rows, d_in -> d_out), for benchmarks."""
    if op == "spd_solve":
        return _spd_args(n, d_out, 1, device)
    if op in ("gram", "pseudo_values", "stats_update", "stats_update2"):
        return _feature_args(op, n, d_in, d_out, device)
    return None


# ------------------------------------------------------------------------------ cache
def machine_key(device: torch.device) -> Dict[str, object]:
    """What the measurements depend on; the cache file is named after its hash."""
    from . import _extension
    key: Dict[str, object] = {"format": FORMAT, "references": REFERENCES,
                              "python": platform.python_version(),
                              "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                              # a new grid means a new file: a cache measured on other points
                              # would leave `auto` without the points it interpolates between
                              "grids": grids_digest()}
    mod = _extension.extension()
    if mod is not None:
        info = getattr(mod, "build_info", lambda: {})()
        key["extension"] = {k: info.get(k) for k in ("compiler", "host_gemm_isa", "cuda_version")}
    try:   # the installed version, without importing Triton (a CPU-only process never does)
        from importlib.metadata import version
        key["triton"] = version("triton")
    except Exception:  # not installed: no Triton backend either
        key["triton"] = None
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    return key


def grids_digest() -> str:
    """A short hash of :data:`GRIDS`, the points a calibration measures."""
    return hashlib.sha256(json.dumps(GRIDS, sort_keys=True).encode()).hexdigest()[:12]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform`` elsewhere): part of the cache key."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ultraedit_kernels")


def cache_path(device: torch.device) -> str:
    digest = hashlib.sha256(json.dumps(machine_key(device), sort_keys=True).encode()).hexdigest()
    return os.path.join(cache_dir(), f"calibration-{device.type}-{digest[:16]}.json")


def mode() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip()
    return value.lower() if value.lower() in ("auto", "off", "refresh", "") else value


# The calibration in use is kept per device and thread count (the cache file's name hashes the
# GPU's name and the threads too): two GPU models in one process, or a process that changes
# torch's thread count, each get their own measurements.
_loaded: Dict[tuple, dict] = {}      # state key (or a fixture's path) -> calibration data in use
_refreshed: set = set()              # state keys measured again in this process


def state_key(device: torch.device) -> tuple:
    """``(type, index, threads)``: what the calibration in use for ``device`` is kept under."""
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return device.type, index, torch.get_num_threads()


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        _log.warning("ignoring unreadable calibration %s (%s)", path, err)
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        _log.warning("ignoring calibration %s: not format %d", path, FORMAT)
        return None
    return data


def _merge_from_disk(data: dict, on_disk: Optional[dict]) -> None:
    """Add to ``data`` what another process measured into the same file since ``data`` was read:
    the ops, shape classes and plans that ``data`` lacks (``data``'s own measurements win)."""
    if not on_disk or on_disk is data:
        return
    ops = data.setdefault("ops", {})
    for op, entry in on_disk.get("ops", {}).items():
        mine = ops.get(op)
        if mine is None:
            ops[op] = entry
        elif mine.get("backends") == entry.get("backends"):
            for cls, points in entry.get("grid", {}).items():
                mine.setdefault("grid", {}).setdefault(cls, points)
            # (points past the grid are not merged: this process may have dropped them on
            # purpose, measuring their class again; at worst one is measured once more)
    for name, plan in on_disk.get("plans", {}).items():
        data.setdefault("plans", {}).setdefault(name, plan)


class _FileLock:
    """An exclusive advisory lock on ``path + '.lock'`` (POSIX ``flock``; a no-op elsewhere):
    two processes calibrating at once each merge the other's measurements instead of one
    overwriting the other's."""

    def __init__(self, path: str):
        self._path, self._fh = path + ".lock", None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self._fh = open(self._path, "a")
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self._fh is not None:
            self._fh.close()   # closing releases the lock
        return False


def _write(path: str, data: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _FileLock(path):
            if os.path.exists(path):
                _merge_from_disk(data, _read(path))
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as fh:
                json.dump(data, fh, indent=1)
            os.replace(tmp, path)
    except OSError as err:  # a read-only home must not break editing
        _log.warning("could not write the calibration cache %s (%s)", path, err)


BUSY = 0.75   # a calibration measured while the 1-minute load average exceeded this many
              # processes per core is flagged: other jobs may have slowed one side of a ratio


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none): recorded with each measurement,
    because a ratio measured while other jobs ran can be off by 10-20% until measured again."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _peak_load(before: Optional[float]) -> Optional[float]:
    """The higher of ``before`` (taken when a measurement started) and the load now."""
    loads = [x for x in (before, load_average()) if x is not None]
    return max(loads) if loads else None


def _busy(load: Optional[float]) -> bool:
    return load is not None and load > BUSY * (os.cpu_count() or 1)


def _note_load(what: str, load: Optional[float]) -> None:
    if _busy(load):
        _log.warning("%s was measured while the load average was %.2f on %d cores: other jobs "
                     "may have skewed it; measure again on a quiet machine with "
                     "`python -m ultraedit_kernels.info --calibrate`", what, load,
                     os.cpu_count() or 1)


def current(device: torch.device) -> Optional[dict]:
    """The calibration in use for ``device``'s type (cached file or fixture), without measuring."""
    m = mode()
    if m == "off":
        return None
    if m not in ("auto", "refresh", ""):
        if m not in _loaded:
            data = _read(m)
            if data is None:
                hint = (" (to disable the calibration, set it to off)"
                        if m.lower() in ("0", "false", "no", "none", "disable", "disabled")
                        else "")
                raise ValueError(f"{ENV_VAR}={m!r}: no calibration file there (expected auto, off, "
                                 f"refresh or the path of a calibration JSON file){hint}")
            _loaded[m] = data
        return _loaded[m]
    key = state_key(device)
    if key not in _loaded:
        if m == "refresh" and key not in _refreshed:
            return None
        data = _read(cache_path(device))
        if data is not None:
            _loaded[key] = data
    return _loaded.get(key)


def reset() -> None:
    """Forget the calibrations loaded in this process (tests; after changing the variable)."""
    global generation
    _loaded.clear()
    _refreshed.clear()
    _decisions.clear()
    generation += 1


# ------------------------------------------------------------------------------ measuring
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_tensor(out):
    if isinstance(out, (tuple, list)):
        return out[1] if len(out) == 3 else out[0]   # stats ops: the mean
    return out


def measure_point(op: str, cls: str, point: Sequence[int], device: torch.device,
                  backends: Sequence[str], rounds: int = ROUNDS) -> Dict[str, object]:
    """Median seconds of ``torch`` and each of ``backends`` at one grid point, alternating,
    and each backend's paired ratio to ``torch`` (``ratios``); ``EXTRA_ROUNDS`` more rounds
    where a ratio is near the threshold (:func:`near_threshold`); ``rounds``: the rounds
    timed."""
    from . import _backends
    impls = _backends.implementations(op)
    args = grid_args(op, cls, point, device)
    names = ["torch"] + [b for b in backends if b != "torch"]
    reference = _first_tensor(impls["torch"].fn(*args)).double()
    times: Dict[str, List[float]] = {b: [] for b in names}
    rejected = {}
    for b in names[1:]:   # warm-up and agreement with the reference
        try:
            got = _first_tensor(impls[b].fn(*args)).double()
            err = float((got - reference).norm() / reference.norm().clamp_min(1e-300))
            if not err <= AGREE_RTOL:
                rejected[b] = f"relative difference {err:.1e} from the reference"
        except Exception as exc:  # a backend that fails here is simply not chosen
            rejected[b] = f"{type(exc).__name__}: {exc}"[:200]
    names = [b for b in names if b not in rejected]
    # a short call is timed as a loop of calls per round (at least ROUND_S long for the
    # reference): single sub-millisecond calls on a loaded machine are mostly scheduler noise
    calls = {b: (lambda fn=impls[b].fn: fn(*args)) for b in names}
    loops = loops_per_round(calls["torch"], device)

    def paired_ratios():
        # per backend, the median over pairs of rounds (A B, B A) of its time over the
        # reference's within the pair: a burst of load that hits a pair hits both sides
        return {b: statistics.median(pair_ratios(times, "torch", b)) for b in names[1:]}

    time_alternating(calls, times, loops, rounds, device)
    ratios = paired_ratios()
    if near_threshold({"torch": 1.0, **ratios}):
        time_alternating(calls, times, loops, EXTRA_ROUNDS, device)
        ratios = paired_ratios()
    seconds = {b: statistics.median(times[b]) for b in names}
    out: Dict[str, object] = {"point": list(point), "seconds": seconds, "ratios": ratios,
                              "rounds": len(times["torch"])}
    if rejected:
        out["rejected"] = rejected
    return out


def loops_per_round(fn, device: torch.device) -> int:
    """Calls per timed round: a short call is timed as a loop at least ``ROUND_S`` long (single
    sub-millisecond calls on a loaded machine are mostly scheduler noise)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = time.perf_counter() - start
    return max(1, min(MAX_LOOPS, int(ROUND_S / max(once, 1e-7))))


def time_alternating(calls: Dict[str, object], times: Dict[str, List[float]], loops: int,
                     rounds: int, device: torch.device) -> None:
    """Append to ``times[name]`` the per-call seconds of ``rounds`` (rounded up to even) rounds
    of every call, in the order of ``calls`` and reversed in every other round."""
    names = list(calls)
    for r in range(rounds + rounds % 2):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn = calls[name]
            _sync(device)
            start = time.perf_counter()
            for _ in range(loops):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) / loops)


def pair_ratios(times: Dict[str, List[float]], fast: str, slow: str) -> List[float]:
    """``slow / fast`` within each pair of rounds ``(2i, 2i + 1)`` of alternating timings
    (A B, B A): per pair, the sum of ``times[slow]`` over the sum of ``times[fast]``."""
    f, s = times[fast], times[slow]
    return [(s[i] + s[i + 1]) / (f[i] + f[i + 1]) for i in range(0, len(f) - 1, 2)]


def point_ratio(p: dict, backend: str) -> Optional[float]:
    """A measured point's time of ``backend`` over the reference's: its paired ratio (points
    cached before those were recorded, and fixtures: the ratio of the median seconds)."""
    ratio = p.get("ratios", {}).get(backend)
    if ratio is not None:
        return ratio if ratio > 0 else None
    secs = p.get("seconds", {})
    if secs.get(backend, 0) > 0 and secs.get("torch", 0) > 0:
        return secs[backend] / secs["torch"]
    return None


def near_threshold(seconds: Dict[str, float]) -> bool:
    """Whether a backend's ratio to the reference (``seconds[b] / seconds["torch"]``) lies
    within ``NEAR`` of the choice threshold ``1 - MARGIN`` (then :func:`measure_point` times
    ``EXTRA_ROUNDS`` more rounds)."""
    ref = seconds.get("torch")
    if not ref:
        return False
    return any(abs(t / ref - (1.0 - MARGIN)) < NEAR for b, t in seconds.items() if b != "torch")


def calibrate_op(op: str, device: torch.device, backends: Sequence[str],
                 rounds: int = ROUNDS, classes: Optional[Sequence[str]] = None
                 ) -> Dict[str, List[dict]]:
    """Measure ``op`` on the grids of ``classes`` (all by default); ``{class: [points]}``."""
    result = {}
    for cls, (_axes, values) in GRIDS[op].items():
        if classes is not None and cls not in classes:
            continue
        points = [()]
        for axis in values:
            points = [p + (v,) for p in points for v in axis]
        result[cls] = [measure_point(op, cls, p, device, backends, rounds) for p in points]
    return result


def candidates(op: str, device: torch.device) -> List[str]:
    """The backends besides the reference that ``auto`` may choose for ``op`` on ``device``
    (available there, not opted out): what a calibration measures."""
    from . import _backends
    impls = _backends.implementations(op)
    names = [b for b, impl in impls.items()
             if b != "torch" and impl.auto_priority >= 0 and impl.available(device) is None]
    if op in GRIDS and any(impls[b].auto_ok is not None for b in names):
        # an implementation auto never sends these calls to (the Triton interpreter) is not
        # worth measuring: ask its auto_ok about the grid's first point
        cls, (_axes, values) = next(iter(GRIDS[op].items()))
        args = grid_args(op, cls, [v[0] for v in values], device)
        names = [b for b in names if impls[b].auto_ok is None or impls[b].auto_ok(*args)]
    return names


def calibrate(device: torch.device, ops: Optional[Sequence[str]] = None,
              rounds: int = ROUNDS, save: bool = True,
              classes: Optional[Sequence[str]] = None) -> dict:
    """Measure every graded op that has a native backend on ``device`` (or ``ops``, and of
    those only the shape ``classes`` given); cache and return the calibration."""
    from . import _backends
    device = torch.device(device)
    key = state_key(device)
    data = _loaded.get(key) or _read(cache_path(device)) or {
        "format": FORMAT, "device": device.type, "machine": machine_key(device), "ops": {}}
    _loaded[key] = data   # a plan measured during the ops' timing lands in it
    _refreshed.add(key)
    if ops is None:   # the references' plans first: the backends are timed against them
        for name, (device_type, _grid, _measure) in _PLANS.items():
            if device_type == device.type:
                _measure_plan(name, device, data, save=False)
    for op in ops or [o for o in GRIDS if o in _backends.registered_ops()]:
        names = candidates(op, device)
        if not names:
            continue
        start, load = time.perf_counter(), load_average()
        entry = data["ops"].get(op)
        if entry is None or classes is None or entry.get("backends") != names:
            entry = data["ops"][op] = {"backends": names, "grid": {}, "calibration_s": 0.0}
        for cls in classes or ():   # points past a grid measured again are measured again
            entry.get("beyond", {}).pop(cls, None)
        entry["grid"].update(calibrate_op(op, device, names, rounds, classes))
        entry["calibration_s"] = round(entry.get("calibration_s", 0.0)
                                       + time.perf_counter() - start, 2)
        entry["load"] = _peak_load(load)
        _note_load(f"the {op} calibration", entry["load"])
    _record_change(device, data, save)
    return data


def _record_change(device: torch.device, data: dict, save: bool = True) -> None:
    """A measurement went into ``data`` (the calibration in use): stamp it, forget the
    decisions made before it and cache it."""
    global generation
    data["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _decisions.clear()
    generation += 1
    if save:
        _write(cache_path(device), data)


# ------------------------------------------------------------------------------ reference plans
# A reference's own machine-dependent choice (gram's CPU row slabs: how many, from how many
# rows), measured once per machine like the backends and cached in the same file, under
# "plans".  The op that owns the choice registers a measuring function returning a JSON-able
# dict that includes the "grid" it measured; a cached plan of another grid is measured again.
_PLANS: Dict[str, Tuple[str, object, object]] = {}   # name -> (device type, grid, measure())
generation = 0   # counts the calibrations' changes in this process: a key for callers' memos


def register_plan(name: str, device_type: str, grid, measure) -> None:
    """Declare the plan ``name`` of ``device_type``: ``measure()`` times it on ``grid``."""
    _PLANS[name] = (device_type, grid, measure)


def reference_plan(name: str, device: torch.device) -> Optional[dict]:
    """The measured plan ``name`` for ``device``: from the calibration in use, measured now
    (``auto``, ``refresh``: once per machine, logged, cached) when it has none for the
    registered grid; ``None`` with ``off``, a fixture without it, or ``ULTRAEDIT_BACKEND=torch``
    (the plain PyTorch computation asked for: the owner's default, nothing measured)."""
    from ._backends import requested_backend

    _device_type, grid, _measure = _PLANS[name]
    m = mode()
    if m == "off" or requested_backend() == "torch":
        return None
    data = current(device)
    plan = (data or {}).get("plans", {}).get(name)
    if plan is not None and plan.get("grid") == _as_json(grid):
        return plan
    if m not in ("auto", "refresh", ""):
        return None
    if data is None:
        data = {"format": FORMAT, "device": device.type, "machine": machine_key(device), "ops": {}}
        _loaded[state_key(device)] = data
        _refreshed.add(state_key(device))
    _log.info("calibrating %s on %s (once per machine; %s=off disables)", name, device.type,
              ENV_VAR)
    return _measure_plan(name, device, data)


def _measure_plan(name: str, device: torch.device, data: dict, save: bool = True) -> dict:
    """Measure the plan ``name`` into the calibration ``data`` (the one in use); cache it."""
    _device_type, grid, measure = _PLANS[name]
    start, load = time.perf_counter(), load_average()
    plan = dict(measure())
    plan.update(grid=_as_json(grid), calibration_s=round(time.perf_counter() - start, 2),
                load=_peak_load(load))
    _note_load(f"the {name} plan", plan["load"])
    data.setdefault("plans", {})[name] = plan
    _record_change(device, data, save)
    return plan


def _as_json(value):
    return json.loads(json.dumps(value))


# ------------------------------------------------------------------------------ deciding
def _interpolate(entries: List[dict], axes_values, feat: Sequence[float], backend: str):
    """log(t_backend / t_torch) interpolated multilinearly in log space over the grid."""
    table = {}
    for e in entries:
        ratio = point_ratio(e, backend)
        if ratio is not None:
            table[tuple(e["point"])] = math.log(ratio)
    # per axis: the two bracketing grid values and the weight of the upper one
    brackets = []
    for values, x in zip(axes_values, feat):
        values = sorted(values)
        lx = math.log(max(float(x), 1e-9))
        if lx <= math.log(values[0]):
            brackets.append(((values[0], values[0]), 0.0))
            continue
        if lx >= math.log(values[-1]):
            brackets.append(((values[-1], values[-1]), 0.0))
            continue
        for lo, hi in zip(values, values[1:]):
            if math.log(lo) <= lx <= math.log(hi):
                brackets.append(((lo, hi), (lx - math.log(lo)) / (math.log(hi) - math.log(lo))))
                break
    total = 0.0
    for corner in range(1 << len(brackets)):
        weight, point = 1.0, []
        for i, ((lo, hi), w) in enumerate(brackets):
            upper = (corner >> i) & 1
            weight *= w if upper else 1.0 - w
            point.append(hi if upper else lo)
        if weight == 0.0:
            continue
        value = table.get(tuple(point))
        if value is None:
            return None
        total += weight * value
    return total


TOO_LARGE = "too large"   # beyond_point: past what a calibration measures


def beyond_point(op: str, cls: str, values: Sequence[float]):
    """The point that decides a call past the grid on a :data:`BEYOND` axis, ``None`` for a
    call the grid decides, or :data:`TOO_LARGE`.

    A :data:`BEYOND` axis past the grid's largest value ``top`` snaps to the nearest (in log)
    of ``top`` and ``top x BEYOND_STEPS`` (rounded to two significant digits); if that is
    ``top`` itself the grid decides.  Every other axis snaps to its nearest grid value.
    Examples: ``spd_solve`` (n up to 1,024, k up to 4,096) with n = 2,000 and 14,336
    right-hand sides -> ``(2000, 16000)``, n = 400 and 14,336 -> ``(384, 16000)``; ``gram``
    (m up to 1,024) at 2,000 x 14,336 -> ``(2000, 14336)``."""
    axes, grid_values = GRIDS[op][cls]
    point, beyond = [], False
    for axis, axis_values, x in zip(axes, grid_values, values):
        lx = math.log(max(float(x), 1.0))
        top = max(axis_values)
        if (op, axis) in BEYOND and x > top:
            if x > top * BEYOND_STEPS[-1] * BEYOND_SLACK:
                return TOO_LARGE
            steps = [top] + [_two_digits(top * s) for s in BEYOND_STEPS]
            snapped = min(steps, key=lambda v: abs(lx - math.log(v)))
            beyond = beyond or snapped != top
        else:
            snapped = min(axis_values, key=lambda v: abs(lx - math.log(v)))
        point.append(int(snapped))
    return tuple(point) if beyond else None


def _two_digits(x: float) -> int:
    """``x`` rounded to two significant digits (2048 -> 2000, 16384 -> 16000): the sizes past
    the grid are measured off powers of two, whose cache-set conflicts read the host Gram 1.0-1.2x
    the reference's time at 2048 x 4096 where 2000 x 4096 measured 0.83-0.87."""
    magnitude = 10 ** max(0, len(str(int(x))) - 2)
    return int(round(x / magnitude)) * magnitude


def _beyond_entry(entry: dict, cls: str, point: Sequence[int]) -> Optional[dict]:
    for e in entry.get("beyond", {}).get(cls, ()):
        if tuple(e["point"]) == tuple(point):
            return e
    return None


def predicted_ratio(data: dict, op: str, backend: str, args: Sequence) -> Optional[float]:
    """Predicted time of ``backend`` relative to the reference for this call (None: unknown)."""
    entry = data.get("ops", {}).get(op)
    feat = features(op, args)
    if entry is None or feat is None:
        return None
    cls, values = feat
    if cls not in GRIDS[op] or cls not in entry["grid"]:
        return None
    axes, grid_values = GRIDS[op][cls]
    point = beyond_point(op, cls, values)
    if point is TOO_LARGE:
        return None
    if point is not None:   # past the grid: only a point measured there decides
        measured = _beyond_entry(entry, cls, point)
        return point_ratio(measured, backend) if measured is not None else None
    log_ratio = _interpolate(entry["grid"][cls], grid_values, values, backend)
    return None if log_ratio is None else math.exp(log_ratio)


def measure_beyond(data: dict, op: str, cls: str, point: Sequence[int], device: torch.device,
                   save: bool = True) -> dict:
    """Measure one :func:`beyond_point` of ``op`` on ``device``, add it to the calibration
    ``data`` (the one in use) and cache it; returns ``data``."""
    entry = data["ops"][op]
    start = time.perf_counter()
    load = load_average()
    measured = measure_point(op, cls, point, device, entry["backends"])
    measured["load"] = _peak_load(load)
    _note_load(f"the {op} point {tuple(point)} past the grid", measured["load"])
    entry.setdefault("beyond", {}).setdefault(cls, []).append(measured)
    entry["calibration_s"] = round(entry.get("calibration_s", 0.0)
                                   + time.perf_counter() - start, 2)
    _record_change(device, data, save)
    return data


_decisions: Dict[tuple, str] = {}   # (op, device, features, candidates, data / setting) -> backend
_calibration_env = None   # reads ULTRAEDIT_CALIBRATION's raw value (set below)


def choose(op: str, device: torch.device, candidates: Sequence[str], args: Sequence) -> str:
    """The backend ``auto`` uses for this call: a candidate measured faster, else ``torch``."""
    global _calibration_env
    if _calibration_env is None:
        from ._backends import env_reader
        _calibration_env = env_reader(ENV_VAR)
    feat = features(op, args)
    if feat is None or not candidates:   # not graded (float64): the reference, nothing to look up
        return "torch"
    # fast path: the decision made for this op, device, shape, candidates and calibration
    # setting since the calibration in use last changed (calibrate() and reset() forget them)
    fast_key = (op, device, feat, tuple(candidates), _calibration_env(), torch.get_num_threads())
    hit = _decisions.get(fast_key)
    if hit is not None:
        return hit
    if op not in GRIDS or mode() == "off":
        return "torch"
    data = current(device)
    memo_key = (op, device, feat, tuple(candidates), id(data))
    if data is not None and memo_key in _decisions:
        _decisions[fast_key] = _decisions[memo_key]
        return _decisions[memo_key]
    cls = feat[0]
    measured = data is not None and cls in data.get("ops", {}).get(op, {}).get("grid", {})
    if not measured:
        if mode() not in ("auto", "refresh", ""):
            return "torch"   # a fixture without this op or class: the reference
        # only the class this call needs (about a second on the 2-core CPU machine when idle)
        _log.info("calibrating %s (%s) on %s for ULTRAEDIT_BACKEND=auto (once per machine; "
                  "%s=off disables)", op, cls, device.type, ENV_VAR)
        data = calibrate(device, [op], classes=[cls])
    point = beyond_point(op, cls, feat[1]) if cls in GRIDS[op] else None
    entry = data.get("ops", {}).get(op) if data is not None else None
    if (point is not None and point is not TOO_LARGE and entry is not None
            and mode() in ("auto", "refresh", "") and _beyond_entry(entry, cls, point) is None):
        _log.info("calibrating %s (%s) on %s at %s, past the grid's largest size (once per "
                  "machine; %s=off disables)", op, cls, device.type,
                  dict(zip(GRIDS[op][cls][0], point)), ENV_VAR)
        try:
            data = measure_beyond(data, op, cls, point, device)
        except Exception as err:  # e.g. out of memory: the call itself must still run
            _log.warning("could not measure %s at %s (%s: %s); the reference decides there",
                         op, point, type(err).__name__, err)
    best, best_ratio = "torch", 1.0 - MARGIN
    for b in candidates:
        ratio = predicted_ratio(data, op, b, args)
        if ratio is not None and ratio < best_ratio:
            best, best_ratio = b, ratio
    if len(_decisions) > 4096:   # shapes vary with every turn's row count: stay bounded
        _decisions.clear()
    _decisions[(op, device, feat, tuple(candidates), id(data))] = best   # data may be new
    _decisions[fast_key] = best
    return best


def _described(op: str, cls: str, p: dict) -> dict:
    return {"point": dict(zip(GRIDS.get(op, {}).get(cls, ((),))[0], p["point"])),
            "vs_torch": {b: round(r, 3) for b in p["seconds"] if b != "torch"
                         for r in (point_ratio(p, b),) if r is not None},
            **({"rejected": p["rejected"]} if p.get("rejected") else {}),
            **({"load": p["load"]} if p.get("load") is not None else {})}


def describe(device: torch.device) -> Dict[str, object]:
    """The calibration in use for ``device`` (no measuring): mode, file, per-op grid ratios."""
    m = mode()
    out: Dict[str, object] = {"mode": m, "margin": MARGIN}
    if m == "off":
        return out
    out["file"] = m if m not in ("auto", "refresh", "") else cache_path(device)
    try:
        data = current(device)
    except ValueError as err:   # a mistyped setting: info shows it rather than a traceback
        out["status"] = f"error: {err}"
        return out
    if data is None:
        out["status"] = "not measured yet (runs at the first auto dispatch that needs it)"
        return out
    out["created"] = data.get("created")
    ops = {}
    for op, entry in data.get("ops", {}).items():
        rows = {}
        for cls, points in entry["grid"].items():
            rows[cls] = [_described(op, cls, p) for p in points]
        ops[op] = {"backends": entry["backends"], "calibration_s": entry.get("calibration_s"),
                   "load": entry.get("load"), "busy": _busy(entry.get("load")), "grid": rows}
        if entry.get("beyond"):
            ops[op]["beyond"] = {cls: [_described(op, cls, p) for p in points]
                                 for cls, points in entry["beyond"].items()}
    out["ops"] = ops
    if data.get("plans"):
        out["plans"] = data["plans"]
    return out

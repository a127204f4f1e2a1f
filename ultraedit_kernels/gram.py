"""Regularized Gram matrices of the key matrix.

Formula (``K`` is N x d, λ = ``ridge``)::

    rows:    G = K Kᵀ + λ I      (N x N, the dual system)
    columns: G = Kᵀ K + λ I      (d x d, the primal system)

``K`` may be any float dtype; the product is accumulated and returned in float32
(float64 input gives float64).  Large float32 CPU products (from 100 rows and 3e7
multiply-adds, :func:`gram_blocks`) compute only the lower tiles of 2-8 row slabs (SYRK-like,
56-75% of the FLOPs) and mirror them; smaller float32 CPU products are one ``addmm`` onto a
cached ``λI``.  Off the diagonal every element is the same dot product as the plain product's
(bit for bit on the AMD Zen 4 measured; another CPU's BLAS may round a tile's last bit apart).
Equivalent PyTorch::

    Kf = K.float(); G = Kf @ Kf.T if rows else Kf.T @ Kf; G.diagonal().add_(ridge)
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional

import torch

from . import _backends, _extension, calibration
from ._validation import check_float_matrix, check_ridge

OP = "gram"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_MASKS: Dict[tuple, torch.Tensor] = {}   # (size, device) -> lower-triangular bool mask


def _lower_mask(n: int, device: torch.device) -> torch.Tensor:
    key = (n, device)
    mask = _MASKS.get(key)
    if mask is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
        if n <= 1024:   # at most 1 MiB each; shapes vary with every turn's row count
            if len(_MASKS) >= 32:
                _MASKS.clear()
            _MASKS[key] = mask
    return mask


_RIDGE_EYES: Dict[tuple, torch.Tensor] = {}   # (m, λ, dtype, device) -> λI[:m, :m]; m = 0: λI
_EYE_MAX = 256


def _ridge_identity(m: int, ridge: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``λ I`` of ``m <= _EYE_MAX`` rows (a view of a cached matrix, never written: it is
    addmm's input), so that a small Gram matrix is one kernel, ``addmm(λI, X, Xᵀ)``, instead of
    a product, a diagonal view and an add.  Measured on the 2-core EPYC (one thread, alternating
    rounds): 1.6-2.1x at m <= 16, 1.14x at m = 50 of 576-wide keys, 1.02-1.06x at m = 128-200.
    Off the diagonal it is ``X @ Xᵀ`` bit for bit (MKL, 3,000 random shapes); on the diagonal
    the BLAS may add λ before the last partial sums instead of after them (a last-bit
    difference in a third of those shapes).  float32 on the CPU only: float64 keeps the plain
    product's bits (m = 1 aside, where either order is one product plus λ)."""
    key = (m, ridge, dtype, device)
    view = _RIDGE_EYES.get(key)   # the view itself is cached: slicing costs ~2 µs per call
    if view is None:
        base_key = (0, ridge, dtype, device)
        eye = _RIDGE_EYES.get(base_key)
        if eye is None or len(_RIDGE_EYES) >= 64:
            _RIDGE_EYES.clear()
            # λ on the diagonal only: eye * λ would put 0 * inf = NaN off it for a λ beyond
            # the dtype's range (the product plus λ then has an infinite diagonal, as before)
            eye = torch.zeros(_EYE_MAX, _EYE_MAX, dtype=dtype, device=device)
            eye.diagonal().add_(ridge)
            _RIDGE_EYES[base_key] = eye
        view = _RIDGE_EYES[key] = eye[:m, :m]
    return view


def _mirrored(g: torch.Tensor) -> torch.Tensor:
    """``g``'s lower triangle with its transpose as the upper one (a new tensor)."""
    return torch.where(_lower_mask(g.shape[0], g.device), g, g.T)


# Blocked (SYRK-like) product on the CPU: the rows of X are split into `b` slabs and only the
# tiles X_i X_jᵀ with j <= i are multiplied ((b + 1) / 2b of the FLOPs); the strictly upper
# tiles are the transposed copies.  The slab edges fall on multiples of 32 rows: MKL's kernels
# run the tiles of aligned slabs 1.1-1.4x faster than the same split at unaligned edges (e.g.
# three slabs of 42-43 rows took 1.4x the one product at m = 128, aligned ones 0.95x).
# Whether slabs pay below ~600 rows depends on the CPU (experiments/gram_slabs.py, one thread,
# alternating rounds, the same torch build): on a 2-core AMD EPYC (Zen 4) 2 slabs took
# 0.89-0.97 of one GEMM's time at m = 100-160 of d >= 4096 and 3-4 slabs 0.74-1.0 at 192-512;
# on a 2-core Intel Xeon the same plan took 1.04-1.25x one GEMM's time up to 320 rows, and
# 2-3 slabs paid there only from ~300-400 rows.  So below _MEASURED_MAX_ROWS the slabs are this
# machine's measurement (_measure_slab_plan, cached with the dispatch calibration): the count
# measured >= 5% faster than one GEMM at the nearest grid point, else one GEMM, which is also
# the choice with ULTRAEDIT_CALIBRATION=off.  From _MEASURED_MAX_ROWS up, _SLAB_PLAN: 4-8 slabs
# measured 1.15-1.4x faster than one GEMM at 1,000-2,000 rows on both CPUs.
# Every element is the same dot product as in the whole product; whether the BLAS accumulates a
# tile's alike is its choice: on the EPYC (MKL) slabs of >= 32 rows gave the lower triangle of
# ``X @ Xᵀ`` bit for bit (m = 100-2000, d = 160-14336, one and two threads), on the Intel Xeon
# 3 or more slabs from d = 800 differed from it in the last bit of some elements.
# One GEMM (below the blocking threshold) is what the plain composition computes; MKL's X Xᵀ
# measured bit-symmetric for every m > 8 tried (m = 9-2000, d = 8-14336) but not for m <= 8
# (its small-matrix kernels), so up to _MIRROR_MAX rows the lower triangle is mirrored (a few
# µs there; ~5 µs, 4% of the product, at m = 50, where it is left out).
_MIRROR_MAX = 16
_BLOCK_MIN_WORK = 3e7        # m * m * d below which one product is used (one thread)
_BLOCK_MIN_WORK_THREADED = 2.5e8   # the same with more threads (from _MEASURED_MAX_ROWS)
# ... and below this reduction length: tiles of a short reduction (the primal Gram Kᵀ K of few
# rows) measured 0.6-0.89x one product at 64-150 rows, ~1.0x at 200, 1.04-1.18x at 300
_BLOCK_MIN_DEPTH = 256
_SLAB_ALIGN = 32             # slab edges fall on multiples of this many rows
_SLAB_PLAN = ((1600, 8), (800, 6), (320, 4), (192, 3), (100, 2))   # (from m rows per thread,
#                                                                      slabs); fewer: one GEMM
_SLAB_MIN_ROWS = 100         # fewer rows: one GEMM, unmeasured
_MEASURED_MAX_ROWS = 640     # from here _SLAB_PLAN; below, this machine's measurement
# What _measure_slab_plan times: one GEMM and these slab counts.  Row counts off multiples of 32,
# as a turn's usually are: one GEMM of an aligned m (256, 320, 384) runs at its best rate, where
# slabs rarely pay, while at 300-450 rows 3 aligned slabs measured 1.05-1.15x (Intel Xeon).
SLAB_GRID = {"m": [100, 150, 200, 300, 400, 500], "d": [576, 1536, 4096], "slabs": [2, 3, 4]}
_SLAB_MARGIN = calibration.MARGIN   # slabs must measure this much faster than one GEMM


def gram_blocks(m: int, d: int, device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """How many row slabs the product of an ``m x d`` matrix is computed in (1: one GEMM).

    float32 only: MKL's float64 product of X Xᵀ rounds differently from its tiles (measured at
    every size tried), so float64 keeps the one GEMM and its exact plain-product bits.  Below
    640 rows the count is this machine's measurement (``ULTRAEDIT_CALIBRATION``; with ``off``,
    or with ``ULTRAEDIT_BACKEND=torch``, one GEMM there)."""
    return _cpu_blocks(m, d, dtype) if device.type == "cpu" else 1


def _cpu_blocks(m: int, d: int, dtype: torch.dtype) -> int:
    if (dtype != torch.float32 or d < _BLOCK_MIN_DEPTH or m * m * d < _BLOCK_MIN_WORK
            or m < _SLAB_MIN_ROWS):
        return 1
    threads = torch.get_num_threads()
    if m < _MEASURED_MAX_ROWS:
        return _measured_blocks(m, d, threads)
    # with t threads MKL splits each tile's product t ways: the plan is read at m / t rows,
    # above a larger threshold (2 threads: ~100-row slabs measured 0.87-0.97x one product,
    # 2 or 3 slabs of 150-300 rows below 2.5e8 multiply-adds 0.8-1.0x, above it 1.1-1.2x)
    if threads > 1 and m * m * d < _BLOCK_MIN_WORK_THREADED:
        return 1
    rows_per_thread = m // max(1, threads)
    for rows, blocks in _SLAB_PLAN:
        if rows_per_thread >= rows:
            return max(1, min(blocks, m // _SLAB_ALIGN))
    return 1


# the two variables' raw values, read from os.environ's own mapping in the keys themselves (not
# through _backends.env_reader's function: one frame less each)
_ENVIRON, _BACKEND_KEY, _CALIBRATION_KEY = _backends.environ_mapping(_backends.ENV_VAR,
                                                                     calibration.ENV_VAR)
_MEASURED: Dict[tuple, int] = {}   # (m, d, threads, setting, calibration generation) -> slabs


def _measured_blocks(m: int, d: int, threads: int) -> int:
    """The slab count this machine's plan gives ``m x d`` (1 where none is measured)."""
    key = (m, d, threads, _ENVIRON.get(_CALIBRATION_KEY), _ENVIRON.get(_BACKEND_KEY),
           calibration.generation)
    blocks = _MEASURED.get(key)
    if blocks is None:
        plan = calibration.reference_plan("gram_slabs", torch.device("cpu"))
        blocks = planned_blocks(plan, m, d) if plan is not None else 1
        if len(_MEASURED) > 1024:
            _MEASURED.clear()
        _MEASURED[key] = blocks
    return blocks


def planned_blocks(plan: dict, m: int, d: int) -> int:
    """The slab count of the grid point of ``plan`` nearest ``(m, d)`` (in log), at most one
    slab per ``_SLAB_ALIGN`` rows."""
    best, best_distance = 1, math.inf
    for point in plan.get("points", ()):
        pm, pd = point["point"]
        distance = abs(math.log(m / pm)) + abs(math.log(d / pd))
        if distance < best_distance:
            best, best_distance = int(point.get("slabs", 1)), distance
    return max(1, min(best, m // _SLAB_ALIGN))


def _measure_slab_plan() -> dict:
    """Time one GEMM and each slab count of :data:`SLAB_GRID` at every grid point (the
    calibration's alternating rounds, on this process's threads); per point the count measured
    at least ``_SLAB_MARGIN`` faster than one GEMM (the fastest such), else 1."""
    cal = calibration
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    points = []
    for m in SLAB_GRID["m"]:
        for d in SLAB_GRID["d"]:
            x = torch.randn(m, d, generator=gen)
            calls = {"1": lambda x=x: _one_gemm(x, 1.0)}
            for b in SLAB_GRID["slabs"]:
                if b <= m // _SLAB_ALIGN:
                    calls[str(b)] = lambda x=x, b=b: _slabbed(x, b, 1.0)
            for fn in calls.values():   # warm-up
                fn()
            times = {name: [] for name in calls}
            loops = cal.loops_per_round(calls["1"], cpu)
            cal.time_alternating(calls, times, loops, cal.ROUNDS, cpu)
            ratios = _slab_ratios(times)
            fastest = min(ratios, key=ratios.get)
            if cal.near_threshold({"torch": 1.0, fastest: ratios[fastest]}):
                # the fastest count measured close to the margin (the fastest of three is the
                # one most likely to have been lucky): more rounds, as the backends' grid does
                cal.time_alternating(calls, times, loops, cal.EXTRA_ROUNDS, cpu)
                ratios = _slab_ratios(times)
                fastest = min(ratios, key=ratios.get)
            slabs = int(fastest) if ratios[fastest] < 1.0 - _SLAB_MARGIN else 1
            points.append({"point": [m, d], "slabs": slabs, "rounds": len(times["1"]),
                           "vs_one_gemm": {k: round(v, 3) for k, v in ratios.items()}})
    return {"points": points}


def _slab_ratios(times: Dict[str, List[float]]) -> Dict[str, float]:
    """Each slab count's time over one GEMM's: the median over pairs of alternating rounds."""
    return {name: statistics.median(calibration.pair_ratios(times, "1", name))
            for name in times if name != "1"}


def slab_edges(m: int, blocks: int) -> List[int]:
    """The row edges of ``blocks`` slabs of ``m`` rows, ``0 = e_0 < e_1 < ... < e_b = m``: the
    inner ones the multiples of ``_SLAB_ALIGN`` nearest ``m i / b`` (equal cuts where a slab
    would get fewer than ``_SLAB_ALIGN`` rows that way)."""
    inner = [int(m * i / (blocks * _SLAB_ALIGN) + 0.5) * _SLAB_ALIGN for i in range(1, blocks)]
    edges = [0] + inner + [m]
    if any(b - a < _SLAB_ALIGN for a, b in zip(edges, edges[1:])):
        edges = [m * i // blocks for i in range(blocks + 1)]
    return edges


def _gram_blocked(x: torch.Tensor, blocks: int) -> torch.Tensor:
    m = x.shape[0]
    g = torch.empty(m, m, dtype=x.dtype, device=x.device)
    edges = slab_edges(m, blocks)
    slabs = [slice(edges[i], edges[i + 1]) for i in range(blocks)]
    for i, ri in enumerate(slabs):
        xi = x[ri]
        for rj in slabs[:i]:
            torch.mm(xi, x[rj].T, out=g[ri, rj])      # a strictly lower tile
            g[rj, ri].copy_(g[ri, rj].T)              # its mirror
        diag = g[ri, ri]
        torch.mm(xi, xi.T, out=diag)
        diag.copy_(_mirrored(diag))
    return g


def gram_reference(x: torch.Tensor, ridge: float, rows: bool) -> torch.Tensor:
    """``X Xᵀ + λI`` (``X = K`` or ``Kᵀ``) with the ridge added to the diagonal; below the
    diagonal it equals ``X @ X.T``'s up to the BLAS's rounding of a tile (bit for bit where
    it rounds tiles like the whole product, as MKL on an AMD Zen 4).  Large CPU inputs compute
    only the lower tiles (:func:`gram_blocks`) and mirror them, small ones (m <= 16) mirror the
    lower triangle: both exactly symmetric; in between the one GEMM (float32 on the CPU: onto
    a cached ``λI``, :func:`_ridge_identity`) is returned as the BLAS computed it (symmetric on
    MKL, as measured)."""
    xf = _compute_rows(x, rows)
    blocks = _cpu_blocks(xf.shape[0], xf.shape[1], xf.dtype) if xf.is_cpu else 1
    # (is_cpu: a tensor flag; device.type costs ~0.3 µs, a tenth of a small call's checks)
    return _planned(xf, ridge, blocks)


def _compute_rows(x: torch.Tensor, rows: bool) -> torch.Tensor:
    """``x`` (``rows``) or ``xᵀ`` in the compute dtype: the matrix whose rows are multiplied."""
    dtype = _compute_dtype(x)
    xf = x if x.dtype == dtype else x.to(dtype)
    return xf if rows else xf.T


def _planned(xf: torch.Tensor, ridge: float, blocks: int) -> torch.Tensor:
    if xf.shape[0] == 1:   # 1 x 1: one addmm onto a cached [[λ]] (bit-identical to mm + add_)
        return torch.addmm(_ridge_identity(1, ridge, xf.dtype, xf.device), xf, xf.T)
    return _slabbed(xf, blocks, ridge) if blocks > 1 else _one_gemm(xf, ridge)


def _one_gemm(xf: torch.Tensor, ridge: float) -> torch.Tensor:
    """``xf xfᵀ + λI`` as one product (``xf`` in its compute dtype)."""
    m = xf.shape[0]
    if m <= _EYE_MAX and xf.dtype == torch.float32 and xf.is_cpu:
        g = torch.addmm(_ridge_identity(m, ridge, xf.dtype, xf.device), xf, xf.T)
        return _mirrored(g) if m <= _MIRROR_MAX else g
    g = xf @ xf.T
    if m <= _MIRROR_MAX:
        g = _mirrored(g)
    g.diagonal().add_(ridge)
    return g


def _slabbed(xf: torch.Tensor, blocks: int, ridge: float) -> torch.Tensor:
    g = _gram_blocked(xf, blocks)
    g.diagonal().add_(ridge)
    return g


# A CPU call's route: what the dispatch and the reference's plan decided for its shape, dtype
# and settings, kept so that the next call of that kind skips the deciding.  The Python that
# decides runs cold after each product (the BLAS has evicted it from the caches): a checked,
# dispatched and planned call measured 40-60 µs above the bare ``X @ X.T`` at 300 x 576 and
# 300 x 1536 on a 2-core Intel Xeon (4-6% of the product), the route ~5-13 µs.
_ROUTES: Dict[tuple, tuple] = {}   # route key -> (the op's registry dict, fn(x, ridge, rows))
_INF = float("inf")


def _route_key(x: torch.Tensor, rows: bool) -> tuple:
    return (x.shape, x.dtype, rows, _ENVIRON.get(_BACKEND_KEY), _ENVIRON.get(_CALIBRATION_KEY),
            calibration.generation, torch.get_num_threads())


def _route(x: torch.Tensor, rows: bool):
    """The decided ``fn(x, ridge, rows)`` of a CPU call like this one, or ``None``."""
    hit = _ROUTES.get(_route_key(x, rows))
    if hit is not None and hit[0] is _backends._REGISTRY.get(OP):
        return hit[1]
    return None


def _decide(x: torch.Tensor, ridge: float, rows: bool):
    _, fn = _backends.select(OP, x.device, x, ridge, rows)
    if not x.is_cpu:
        return fn
    if fn is gram_reference:
        fn = _reference_route(x, rows)
    if len(_ROUTES) > 1024:   # shapes vary with every turn's row count: stay bounded
        _ROUTES.clear()
    _ROUTES[_route_key(x, rows)] = (_backends._REGISTRY.get(OP), fn)
    return fn


def _reference_route(x: torch.Tensor, rows: bool):
    """The reference with its plan decided for calls like this one: one flat function for the
    common float32 products (each Python frame it saves is a few µs when cold)."""
    dtype = _compute_dtype(x)
    m, d = x.shape if rows else x.shape[::-1]
    blocks = _cpu_blocks(m, d, dtype)
    if blocks > 1 or m <= _MIRROR_MAX or dtype != torch.float32 or x.dtype != dtype or not rows:
        def planned(x, ridge, rows):
            return _planned(_compute_rows(x, rows), ridge, blocks)
        return planned
    if m <= _EYE_MAX:
        def onto_ridge(x, ridge, rows):   # the cached λI's view: _ridge_identity
            eye = _RIDGE_EYES.get((m, ridge, torch.float32, x.device))
            if eye is None:
                eye = _ridge_identity(m, ridge, torch.float32, x.device)
            return torch.addmm(eye, x, x.T)
        return onto_ridge

    module = _extension.extension()
    host_one = getattr(module, "gram_one", None) if module is not None else None
    if host_one is not None:   # the same two ATen calls made from C++ (csrc/ops.cpp), called
        return host_one        # with the route's (x, ridge, rows): no Python frame between

    def one_gemm(x, ridge, rows):
        g = x @ x.T
        g.diagonal().add_(ridge)
        return g
    return one_gemm


def _gram_body(x, ridge, rows):
    m = x.shape[0] if rows else x.shape[1]
    if m == 0:   # no keys: the empty product (the public gram refuses it; the raw op returns it)
        return x.new_empty((0, 0), dtype=_compute_dtype(x))
    fn = (_route(x, rows) if x.is_cpu else None) or _decide(x, ridge, rows)
    return fn(x, ridge, rows)


@torch.library.custom_op("ultraedit::gram", mutates_args=())
def gram_op(x: torch.Tensor, ridge: float, rows: bool) -> torch.Tensor:
    return _gram_body(x, ridge, rows)


gram_call = _backends.eager(gram_op, _gram_body)


@gram_op.register_fake
def _(x, ridge, rows):
    n = x.shape[0] if rows else x.shape[1]
    return x.new_empty((n, n), dtype=_compute_dtype(x))


_backends.register_impl(OP, "torch", gram_reference)
calibration.register_plan("gram_slabs", "cpu", SLAB_GRID, _measure_slab_plan)


# --- compiled implementation (csrc/: torch.ops.ultraedit_C.gram, CPU) -------------------------

def _cpp_available(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return "the cpp backend computes CPU tensors only"
    return _extension.native_op_ready("cpu", "gram", _fake_native)


def _fake_native(x, ridge, rows):
    n = x.shape[0] if rows else x.shape[1]
    return x.new_empty((n, n))


def gram_native(x: torch.Tensor, ridge: float, rows: bool) -> torch.Tensor:
    """The host build: only the lower triangle's micro-tiles are multiplied (the built-in packed
    kernels of ``csrc/cholesky/host_gemm.cpp``), then mirrored: exactly symmetric, rounded in
    another order than ``X @ X.T`` (a ``gram`` tolerance apart)."""
    dtype = _compute_dtype(x)
    return torch.ops.ultraedit_C.gram(x if x.dtype == dtype else x.to(dtype), float(ridge),
                                      bool(rows))


# `auto` uses it only where this machine's calibration measured it faster than the reference.
# Which side wins moves with the reference's slabs and the load: on the 2-core EPYC (one
# thread) the host build took 0.53-0.97 of the reference's time from 128 rows and 0.92-1.1 at
# 64, and 0.82x at 100 x 4096 (where a floor of 128 rows had kept `auto` on the reference);
# with two threads it wins only at m = 2000 (it is serial below ~1e9 multiply-adds). Below
# AUTO_MIN_ROWS, the calibration grid's first row, `auto` does not even consult it: the lookup
# costs a few µs, a tenth of a 1 x 576 or 50 x 576 product.
AUTO_MIN_ROWS = 64


def _auto_ok(x, ridge, rows=True) -> bool:
    return (x.shape[0] if rows else x.shape[1]) >= AUTO_MIN_ROWS


_backends.register_impl(OP, "cpp", gram_native, available=_cpp_available, auto_ok=_auto_ok)


def gram(x: torch.Tensor, ridge: float = 1.0, rows: bool = True) -> torch.Tensor:
    """``X Xᵀ + λI`` with ``X = x`` (``rows=True``: keys N x d -> N x N) or ``X = xᵀ``
    (``rows=False``: d x d), float32 (float64 for float64 input), exactly symmetric.

    Equivalent PyTorch: ``x.float() @ x.float().T + ridge * torch.eye(N)`` (rows); see the
    module docstring for how each backend computes it."""
    if (type(x) is torch.Tensor and x.is_cpu and not x.requires_grad and type(ridge) is float
            and 0.0 < ridge < _INF and not torch.compiler.is_compiling()):
        # a call of a shape already checked and decided: its route (one lookup, no frames:
        # _route's lookup with _route_key's key written out).  Not while torch.compile traces
        # (it sees the registered op), nor for an input in a graph (gram_call runs it without
        # grad, as every backend computes it).
        hit = _ROUTES.get((x.shape, x.dtype, rows, _ENVIRON.get(_BACKEND_KEY),
                           _ENVIRON.get(_CALIBRATION_KEY), calibration.generation,
                           torch.get_num_threads()))
        if hit is not None and hit[0] is _backends._REGISTRY.get(OP):
            return hit[1](x, ridge, rows)
    check_float_matrix("x", x)
    check_ridge(ridge)
    return gram_call(x, float(ridge), bool(rows))

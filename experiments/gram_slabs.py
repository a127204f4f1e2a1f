"""How many row slabs the CPU ``gram`` reference should split ``X Xᵀ`` into, and where.

The float32 CPU reference multiplies only the tiles on and below the diagonal of ``b`` row
slabs ((b+1)/2b of the FLOPs) above a size threshold (``ultraedit_kernels.gram.gram_blocks``).
For each (m, d) this times, in alternating rounds on the chosen number of threads:

* ``one``: one GEMM, ``addmm(λI, X, Xᵀ)`` (m <= 256) or ``X @ Xᵀ`` plus the ridge: the baseline;
* ``b{2,3,4,6,8}`` with equal cuts (``a1``) and with the inner edges on multiples of 32
  rows (``a32``), where every slab keeps >= 16 rows;
* ``shipped``: ``gram_reference`` as it is;

and prints each arm's median per-pair speed-up over ``one`` (> 1: faster), with whether its
lower triangle equals the plain product's bit for bit.

``--previous`` instead times the reference as it is against the plan it replaced (one GEMM
below 2.5e8 multiply-adds, ``addmm`` onto ``λI`` up to 256 rows; above, at most 4 equal slabs
of >= 100 rows) at the shapes the CHANGELOG quotes, on ``--threads`` threads.

    PYTHONPATH=. python experiments/gram_slabs.py --json experiments/results/gram_slabs.json
    PYTHONPATH=. python experiments/gram_slabs.py --previous --threads 1 \
        --json experiments/results/gram_slabs_previous_t1.json
"""
import argparse
import json
import statistics
import sys
import time

import torch

import ultraedit_kernels  # noqa: F401
gram_mod = sys.modules["ultraedit_kernels.gram"]


def blocked(x, edges, ridge=1.0):
    m = x.shape[0]
    g = torch.empty(m, m)
    slabs = [slice(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    for i, ri in enumerate(slabs):
        xi = x[ri]
        for rj in slabs[:i]:
            torch.mm(xi, x[rj].T, out=g[ri, rj])
            g[rj, ri].copy_(g[ri, rj].T)
        diag = g[ri, ri]
        torch.mm(xi, xi.T, out=diag)
        diag.copy_(gram_mod._mirrored(diag))
    g.diagonal().add_(ridge)
    return g


def one_gemm(x, ridge=1.0):
    m = x.shape[0]
    if m <= gram_mod._EYE_MAX:
        return torch.addmm(gram_mod._ridge_identity(m, ridge, x.dtype, x.device), x, x.T)
    g = x @ x.T
    g.diagonal().add_(ridge)
    return g


def edges(m, b, align):
    inner = [int(m * i / (b * align) + 0.5) * align for i in range(1, b)]
    return [0] + inner + [m]


def previous_reference(x, ridge=1.0):
    """The plan before the aligned slabs."""
    m, d = x.shape
    if m <= gram_mod._EYE_MAX and m * m * d < 2.5e8:
        return torch.addmm(gram_mod._ridge_identity(m, ridge, x.dtype, x.device), x, x.T)
    b = max(1, min(4, m // 100)) if m * m * d >= 2.5e8 else 1
    if b == 1:
        return one_gemm(x, ridge)
    return blocked(x, [m * i // b for i in range(b + 1)], ridge)


PREVIOUS_SHAPES = [(100, 576), (100, 1536), (100, 4096), (100, 14336), (128, 4096), (200, 1536),
                   (256, 4096), (300, 576), (300, 1536), (320, 4096), (400, 1536), (400, 4096),
                   (400, 14336), (500, 4096), (1000, 4096), (2000, 4096), (2000, 14336)]


def measure_previous(m, d, rounds, target_s=0.03):
    x = torch.randn(m, d)
    arms = {"previous": lambda: previous_reference(x),
            "shipped": lambda: gram_mod.gram_reference(x, 1.0, True)}
    loops = max(1, int(target_s / max(per_call(arms["previous"], 2), 1e-7)))
    times = {n: [] for n in arms}
    for r in range(rounds):
        for n in (("previous", "shipped") if r % 2 == 0 else ("shipped", "previous")):
            times[n].append(per_call(arms[n], loops))
    ratios = sorted(a / b for a, b in zip(times["previous"], times["shipped"]))
    return {"m": m, "d": d, "shipped_blocks": gram_mod.gram_blocks(m, d, x.device),
            "previous_us": statistics.median(times["previous"]) * 1e6,
            "speedup": statistics.median(ratios), "pair_ratios": ratios}


def per_call(fn, loops):
    t = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - t) / loops


def measure(m, d, rounds, target_s=0.02):
    x = torch.randn(m, d)
    arms = {"one": lambda: one_gemm(x), "shipped": lambda: gram_mod.gram_reference(x, 1.0, True)}
    for b in (2, 3, 4, 6, 8):
        for align in (1, 32):
            e = edges(m, b, align)
            if min(hi - lo for lo, hi in zip(e, e[1:])) >= 16:
                arms[f"b{b}a{align}"] = (lambda e=e: blocked(x, e))
    plain = (x @ x.T).tril(-1)
    exact = {name: bool(torch.equal(fn().tril(-1), plain)) for name, fn in arms.items()}
    loops = max(1, int(target_s / max(per_call(arms["one"], 2), 1e-7)))
    names = list(arms)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(per_call(arms[n], loops))
    return {"m": m, "d": d, "shipped_blocks": gram_mod.gram_blocks(m, d, x.device),
            "one_us": statistics.median(times["one"]) * 1e6, "exact": exact,
            "speedup": {n: statistics.median(a / b for a, b in zip(times["one"], times[n]))
                        for n in names[1:]}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--m", type=int, nargs="+",
                   default=[64, 100, 128, 160, 192, 256, 320, 400, 512, 1000, 2000])
    p.add_argument("--d", type=int, nargs="+", default=[576, 1536, 4096, 14336])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--previous", action="store_true",
                   help="the shipped reference against the plan it replaced")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    if args.previous:
        for m, d in PREVIOUS_SHAPES:
            row = measure_previous(m, d, args.rounds if m * m * d < 4e9 else 4)
            rows.append(row)
            print(f"m={m:5d} d={d:6d} shipped: {row['shipped_blocks']} slabs, "
                  f"{row['speedup']:.3f}x the previous plan "
                  f"({row['pair_ratios'][0]:.2f}-{row['pair_ratios'][-1]:.2f})", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"threads": args.threads, "torch": torch.__version__,
                           "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
        return
    for d in args.d:
        for m in args.m:
            row = measure(m, d, args.rounds if m * m * d < 4e9 else 2)
            rows.append(row)
            best = max(row["speedup"].items(), key=lambda kv: kv[1])
            print(f"m={m:5d} d={d:6d} shipped: {row['shipped_blocks']} slabs "
                  f"{row['speedup']['shipped']:.2f}x; best {best[0]} {best[1]:.2f}x; "
                  + " ".join(f"{k}={v:.2f}" for k, v in row["speedup"].items() if k != "shipped")
                  + ("" if all(row["exact"].values()) else
                     " inexact: " + ",".join(k for k, v in row["exact"].items() if not v)),
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__,
                       "command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

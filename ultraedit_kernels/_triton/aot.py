"""Ahead-of-time compile every Triton kernel configuration for sm_80 and sm_90 (no GPU needed).

    python -m ultraedit_kernels._triton.aot [--json] [--target cuda:80:32 ...]

Compiles each :class:`~._common.AotSpec` that the launchers can choose with ``triton.compile``
(Triton ships ``ptxas``), printing its shared-memory use, registers and spills; exits 1 when any
configuration fails to lower, compile, or fit the target's shared memory.  ``TRITON_INTERPRET``
must be unset (``triton.jit`` returns interpreted functions under it): this entry point
re-executes itself without it when needed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

# opt-in shared memory per block (bytes), from the CUDA programming guide
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MODULES = ("pseudo_values", "stats_update", "gram")


def all_specs():
    import importlib
    specs = []
    for name in MODULES:
        specs.extend(importlib.import_module(f"ultraedit_kernels._triton.{name}").aot_specs())
    return specs


def compile_all(targets) -> List[Dict]:
    import triton
    from triton.backends.compiler import GPUTarget

    rows = []
    for spec in all_specs():
        for backend, arch, warp in targets:
            row = {"name": spec.name, "target": f"{backend}:{arch}:{warp}",
                   "num_warps": spec.num_warps, "num_stages": spec.num_stages}
            start = time.perf_counter()
            try:
                compiled = triton.compile(spec.source(), target=GPUTarget(backend, arch, warp),
                                          options={"num_warps": spec.num_warps,
                                                   "num_stages": spec.num_stages})
                meta = compiled.metadata
                row.update(ok=True, shared=int(meta.shared),
                           cubin_bytes=len(compiled.asm.get("cubin", b"")),
                           registers=_ptx_registers(compiled.asm.get("ptx", "")))
                limit = SHARED_LIMIT.get(arch)
                if limit is not None and row["shared"] > limit:
                    row.update(ok=False, error=f"shared memory {row['shared']} > {limit}")
            except Exception as err:  # report every failure, not only the first
                row.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000])
            row["seconds"] = round(time.perf_counter() - start, 3)
            rows.append(row)
    return rows


def _ptx_registers(ptx: str):
    """Number of 32-bit registers the PTX declares (an upper bound before ptxas)."""
    import re
    counts = [int(n) for n in re.findall(r"\.reg \.b32\s+%r<(\d+)>", ptx)]
    return max(counts) if counts else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ultraedit_kernels._triton.aot",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    parser.add_argument("--target", action="append", default=None,
                        help="backend:arch:warp_size, e.g. cuda:80:32 (repeatable)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "ultraedit_kernels._triton.aot"]
                               + (argv if argv is not None else sys.argv[1:]), env=env)
    from ._common import AOT_TARGETS
    targets = AOT_TARGETS
    if args.target:
        targets = [(b, int(a), int(w)) for b, a, w in (t.split(":") for t in args.target)]
    rows = compile_all(targets)
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        for r in rows:
            status = "ok  " if r["ok"] else "FAIL"
            detail = (f"shared={r['shared']:6d} B  warps={r['num_warps']} stages={r['num_stages']}"
                      if r["ok"] else r["error"])
            print(f"{status} {r['target']:11s} {r['name']:36s} {detail}  ({r['seconds']:.1f}s)")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

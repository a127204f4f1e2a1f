"""``python -m ultraedit_kernels.info [--json] [--calibrate]``: what is built, where each op
dispatches, and the dispatch calibration of this machine (``--calibrate`` measures it again).

Never initializes CUDA unless a CUDA device is already usable (``torch.cuda.is_available()``
only queries the driver).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
from typing import Any, Dict

import torch

from . import __version__, _backends, _extension, _optional_backends, calibration


def _triton_version():
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton
        return triton.__version__
    except Exception as err:  # pragma: no cover - broken installs
        return f"broken ({type(err).__name__}: {err})"


def collect() -> Dict[str, Any]:
    """Everything ``info`` prints, as a dict (stable keys, JSON-serializable)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    backends = {}
    for name in _backends.BACKENDS[1:]:
        backends[name] = {dev: (_backends.backend_status(name, torch.device(dev)) or "available")
                          for dev in devices}
    requested = os.environ.get(_backends.ENV_VAR, "auto")
    dispatch = {}
    for dev in devices:
        dispatch[dev] = _backends.dispatch_table(torch.device(dev))
    native_entry = getattr(_extension.extension(), "add_shift", None) is not None
    if native_entry and requested.strip().lower() in ("auto", "cpp", "") and "apply_shift" in \
            dispatch["cpu"]:
        dispatch["cpu"]["apply_shift"] += " (float32/float64: entered natively, add_shift)"
    return {
        "ultraedit_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "triton": _triton_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "extension": {
            "loaded": _extension.extension() is not None,
            "host_kernels": _extension.has_cpu_kernels(),
            "cuda_kernels": _extension.has_cuda_kernels(),
            "error": _extension.load_error(),
            "build_info": getattr(_extension.extension(), "build_info", lambda: None)(),
        },
        "optional_modules_not_loaded": _optional_backends.load_all(),
        "requested_backend": requested,
        "backends": backends,
        "dispatch": dispatch,
        "calibration": {dev: calibration.describe(torch.device(dev)) for dev in devices},
    }


def _print_text(info: Dict[str, Any]) -> None:
    print(f"ultraedit_kernels {info['ultraedit_kernels']}  (python {info['python']}, "
          f"torch {info['torch']}, CUDA {info['torch_cuda'] or 'none'})")
    print(f"GPUs: {', '.join(info['devices']) or 'none'}")
    print(f"triton: {info['triton'] or 'not installed'}"
          + ("  [TRITON_INTERPRET=1: kernels run on the CPU]" if info["triton_interpret"] else ""))
    ext = info["extension"]
    if ext["loaded"]:
        print(f"extension _C: loaded (host kernels: {ext['host_kernels']}, "
              f"CUDA kernels: {ext['cuda_kernels']}) {ext['build_info'] or ''}")
    else:
        print(f"extension _C: not loaded ({ext['error']})")
    for mod, err in info["optional_modules_not_loaded"].items():
        print(f"optional module {mod}: not loaded ({err})")
    print("backends:")
    for name, per_dev in info["backends"].items():
        for dev, status in per_dev.items():
            print(f"  {name:7s} {dev:5s} {status}")
    print(f"dispatch with ULTRAEDIT_BACKEND={info['requested_backend']}:")
    for dev, table in info["dispatch"].items():
        for op, backend in table.items():
            print(f"  {dev:5s} {op:18s} -> {backend}")
    for dev, cal in info["calibration"].items():
        print(f"calibration ({dev}): {calibration.ENV_VAR}={cal['mode']}"
              + (f", {cal['file']}" if cal.get("file") else ""))
        if cal.get("status"):
            print(f"  {cal['status']}")
        cores = os.cpu_count() or 1
        for op, entry in cal.get("ops", {}).items():
            load = entry.get("load")
            print(f"  {op} (measured in {entry['calibration_s']} s"
                  + (f" at load {load:.2f} on {cores} cores" if load is not None else "")
                  + f"; time / torch, chosen below {1 - cal['margin']:.2f}):")
            if entry.get("busy"):
                print("    measured on a busy machine: other jobs may have skewed these ratios; "
                      "measure again on a quiet one with --calibrate")
            tables = [(cls, rows) for cls, rows in entry["grid"].items()]
            tables += [(f"{cls}, past the grid", rows)
                       for cls, rows in entry.get("beyond", {}).items()]
            for cls, rows in tables:
                cells = "  ".join(
                    ",".join(f"{k}={v}" for k, v in r["point"].items()) + ": "
                    + " ".join(f"{b} {x:.2f}" for b, x in r["vs_torch"].items())
                    + (f" (load {r['load']:.2f})" if "load" in r else "")
                    for r in rows)
                print(f"    {cls:8s} {cells}")
        for name, plan in cal.get("plans", {}).items():
            print(f"  the reference's {name} (measured in {plan.get('calibration_s')} s): "
                  + "  ".join(",".join(map(str, p["point"])) + f": {p.get('slabs')}"
                              for p in plan.get("points", ())))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ultraedit_kernels.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure the dispatch calibration again first (a few seconds per "
                             "device) and cache it")
    args = parser.parse_args(argv)
    if args.calibrate:
        for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            calibration.calibrate(torch.device(dev))
    info = collect()
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        _print_text(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())

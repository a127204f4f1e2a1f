"""GPU acceptance run: every GPU figure of the project in one command, inside a time budget.

    bash scripts/gpu_acceptance.sh --out DIR              # on a CUDA machine (about 8 minutes)
    bash scripts/gpu_acceptance.sh --cpu-smoke --out DIR  # the same code paths, tiny, on a CPU

Runs from the source tree (nothing is pip-installed; no network; no model download). Each step
runs in its own process with its own time budget (a CUDA fault or a hang in one step cannot
take the others down); a step that fails is recorded with its error and the run goes on; a step
that does not fit in what is left of the budget is skipped, and the output says so.

Steps (budgets in seconds on a GPU; the whole run ends within ``--budget-s``, default 480):

``build`` (150)       the native extension compiled in place against the torch present
                      (``python setup.py build_ext --inplace``, only this card's architecture,
                      ``MAX_JOBS`` = cores); ``--cpu-smoke`` configures it without compiling
``env`` (20)          card, driver, torch/CUDA/triton/transformers versions,
                      ``python -m ultraedit_kernels.info --json``
``gpu_tests`` (60)    ``pytest -m gpu`` (the GPU-marked tests)
``kernels`` (50)      each Triton kernel against the torch path at 7B shapes (4096 <-> 14336,
                      N in {100, 400, 2000}, bf16 and fp32): median time, achieved GB/s beside
                      a device-to-device copy, speed-up, relative difference to the torch path
``cholesky`` (25)     the CUDA Cholesky against ``torch.linalg.cholesky_ex`` + ``cholesky_solve``
                      (cuSOLVER), batched over all modules of a turn, and what ``auto`` picks
``turn_embedded`` (60) one lifelong turn of 100 edits on a random-init model of the embedded
``turn_mistral`` (60)  model's shape, of Mistral-7B and of Llama-3-8B (bf16, the paper's
``turn_llama3`` (50)   modules and settings): time per turn, the editor's share, peak memory
                      (``max_memory_allocated``), each against the paper's path
                      (``bench/paper_baseline.py``) in the same process, and the
                      ``ultraedit.plan`` prediction against the measured peak

Output: ``DIR/acceptance.json`` (every figure, each ratio beside its baseline) and
``DIR/acceptance.md`` (the same as tables), plus ``DIR/steps/<step>.json`` and logs.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "ultraedit-gpu-acceptance/1"
STEPS = ["build", "env", "gpu_tests", "kernels", "cholesky", "turn_embedded", "turn_mistral",
         "turn_llama3"]
BUDGETS = {"build": 150, "env": 20, "gpu_tests": 60, "kernels": 50, "cholesky": 25,
           "turn_embedded": 60, "turn_mistral": 60, "turn_llama3": 50}
SMOKE_BUDGETS = {"build": 30, "env": 20, "gpu_tests": 40, "kernels": 30, "cholesky": 20,
                 "turn_embedded": 40, "turn_mistral": 40, "turn_llama3": 40}
MIN_STEP_S = 8            # a step is not started with less than this left
PAPER_SETTINGS = dict(lr=1e-6, positions="answer", steps=1, hold_done=False, memory=0.0,
                      preserve=0.0, protect_mean=0.0)
MICRO_BATCH = 10

# model configurations of the turn steps: (label, transformers config fields)
TURN_MODELS = {
    "turn_embedded": ("random-init SmolLM2-135M shape (llama, hidden 576, MLP 1536, 30 layers)",
                      "smollm2-135m"),
    "turn_mistral": ("random-init Mistral-7B config", "mistral-7b"),
    "turn_llama3": ("random-init Llama-3-8B config", "llama-3-8b"),
}
SMOKE_MODELS = {
    "turn_embedded": dict(model_type="llama", vocab_size=512, hidden_size=64,
                          intermediate_size=160, num_hidden_layers=6, num_attention_heads=4,
                          num_key_value_heads=2, tie_word_embeddings=True),
    "turn_mistral": dict(model_type="mistral", vocab_size=512, hidden_size=64,
                         intermediate_size=224, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False),
    "turn_llama3": dict(model_type="llama", vocab_size=640, hidden_size=64,
                        intermediate_size=224, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=False),
}


# ------------------------------------------------------------------------------ helpers
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    os.replace(tmp, path)


def _median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


class Deadline:
    """Seconds left of a step's budget; cases check it and skip what does not fit."""

    def __init__(self, at: float):
        self.at = at

    def left(self) -> float:
        return self.at - time.time()

    def allows(self, seconds: float) -> bool:
        return self.left() > seconds


def _device(smoke: bool):
    import torch
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is visible (use --cpu-smoke on a machine without one)")
    return torch.device("cuda")


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], Any], device, smoke: bool) -> List[float]:
    """Per-call times in ms: CUDA events with the L2 flushed (``triton.testing.do_bench``) on a
    GPU, ``perf_counter`` repeats on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return list(do_bench(fn, warmup=5, rep=25, return_mode="all"))
    fn()
    out = []
    for _ in range(3 if smoke else 10):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _rel_diff(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------ build
def step_build(args, deadline: Deadline) -> Dict[str, Any]:
    import torch
    env = dict(os.environ)
    jobs = os.cpu_count() or 2
    env["MAX_JOBS"] = str(jobs)
    env["ULTRAEDIT_REQUIRE_NATIVE"] = "1"
    arch = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        arch = f"{major}.{minor}"
        env["TORCH_CUDA_ARCH_LIST"] = arch
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    out: Dict[str, Any] = {"command": " ".join(cmd), "max_jobs": jobs, "cuda_arch": arch,
                           "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if args.cpu_smoke:
        # configure exactly as the GPU run does, without compiling (CI builds the host part)
        code = ("import setup_native as s; e = s.native_extensions(); "
                "print('extensions:', [x.name for x in e]); "
                "print('cuda:', s.cuda_skip_reason() or 'built'); print('arch:', s.cuda_arch_list())")
        cmd = [sys.executable, "-c", code]
        out["compiled"] = False
        out["note"] = "--cpu-smoke: configured only (the compile runs on the GPU machine)"
    t0 = time.time()
    timeout = max(1.0, deadline.left() - 2)
    log_path = os.path.join(args.out, "build.log")
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout)
    out["seconds"] = time.time() - t0
    out["returncode"] = proc.returncode
    out["log"] = os.path.relpath(log_path, args.out)
    with open(log_path) as fh:
        out["log_tail"] = fh.read()[-2000:]
    if not args.cpu_smoke:
        out["compiled"] = proc.returncode == 0
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}: {out['log_tail'][-600:]}")
    return out


# ------------------------------------------------------------------------------ env
def step_env(args, deadline: Deadline) -> Dict[str, Any]:
    import torch
    out: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
                           "hostname": platform.node()}
    try:
        with open("/proc/cpuinfo") as fh:
            out["cpu"] = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        out["cpu"] = platform.processor()
    for mod in ("triton", "transformers", "accelerate", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 - a missing optional module is a fact to record
            out[mod] = f"not importable: {type(err).__name__}: {err}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["card"] = torch.cuda.get_device_name(0)
        out["capability"] = f"{props.major}.{props.minor}"
        out["memory_gib"] = props.total_memory / 2**30
        out["multiprocessors"] = props.multi_processor_count
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            out["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            out["driver"] = None
    else:
        out["card"] = f"cpu: {out['cpu']}"
        out["capability"] = None
        out["driver"] = None
    info = subprocess.run([sys.executable, "-m", "ultraedit_kernels.info", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=max(1.0, deadline.left() - 1))
    out["ultraedit_kernels_info"] = (json.loads(info.stdout) if info.returncode == 0
                                     else {"error": info.stderr[-2000:]})
    return out


# ------------------------------------------------------------------------------ GPU tests
def step_gpu_tests(args, deadline: Deadline) -> Dict[str, Any]:
    import xml.etree.ElementTree as ET
    xml_path = os.path.join(args.out, "gpu_tests.xml")
    # the files holding GPU-marked tests (collecting the whole suite would import modules that
    # need packages a bare GPU machine lacks)
    tests_dir = os.path.join(ROOT, "tests")
    targets = sorted(os.path.join("tests", f) for f in os.listdir(tests_dir)
                     if f.startswith("test_") and f.endswith(".py")
                     and "mark.gpu" in open(os.path.join(tests_dir, f)).read())
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs",
           f"--junitxml={xml_path}", *targets]
    env = dict(os.environ)
    if not args.cpu_smoke:
        env.pop("TRITON_INTERPRET", None)   # the GPU tests launch real kernels
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=max(1.0, deadline.left() - 2))
    out: Dict[str, Any] = {"command": " ".join(cmd), "files": targets, "returncode": proc.returncode,
                           "seconds": time.time() - t0, "output_tail": proc.stdout[-3000:]}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: List[str] = []
    if os.path.exists(xml_path):
        root = ET.parse(xml_path).getroot()
        for suite in root.iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    out.update(counts)
    out["failed"] = failed
    if proc.returncode not in (0, 5):   # 5: nothing collected (no GPU-marked test selected)
        raise RuntimeError(f"pytest -m gpu exited {proc.returncode}: {len(failed)} failed: "
                           f"{failed[:10]}")
    return out


# ------------------------------------------------------------------------------ kernels
def step_kernels(args, deadline: Deadline) -> Dict[str, Any]:
    import torch
    import ultraedit_kernels  # noqa: F401  (registers every op)
    import ultraedit_kernels.stats_update2  # noqa: F401
    from ultraedit_kernels import _backends
    from ultraedit_kernels.running_stats import EPS

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from _common import kernel_bytes_moved

    device = _device(args.cpu_smoke)
    if args.cpu_smoke:
        shapes, ns, dtypes = [(64, 96), (96, 64)], [24], {"fp32": torch.float32}
        copy_numel = 1 << 20
    else:
        shapes, ns = [(4096, 14336), (14336, 4096)], [100, 400, 2000]
        dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
        copy_numel = 1 << 28
    src = torch.empty(copy_numel, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = _median(_time_ms(lambda: dst.copy_(src), device, args.cpu_smoke))
    copy_gbps = 2 * src.numel() * 4 / (copy_ms * 1e-3) / 1e9
    del src, dst
    rows: List[Dict[str, Any]] = []
    skipped: List[str] = []
    ops = ("pseudo_values", "stats_update", "stats_update2", "gram")
    for n in ns:
        for d_in, d_out in shapes:
            gen = torch.Generator(device).manual_seed(n + d_in)
            keys32 = torch.randn(n, d_in, generator=gen, device=device) * 0.7 + 0.05
            grads32 = (torch.randn(n, d_out, generator=gen, device=device) + 0.1) * 1e-3
            for dname, dtype in dtypes.items():
                keys, grads = keys32.to(dtype), grads32.to(dtype)
                x = torch.cat([keys, grads], 1)
                mean, std = x.double().mean(0), x.double().std(0)
                count = torch.tensor(1000.0, dtype=torch.float64, device=device)
                m2 = std.square() * 999
                for op in ops:
                    case = f"{op} {dname} {d_in}->{d_out} N={n}"
                    if not deadline.allows(3):
                        skipped.append(case)
                        continue
                    calls = {}
                    impls = _backends.implementations(op)
                    row: Dict[str, Any] = {"op": op, "dtype": dname, "d_in": d_in, "d_out": d_out,
                                           "n": n}
                    for impl in ("torch", "triton"):
                        why = impls[impl].available(device)
                        if why is not None:
                            row[f"{impl}_unavailable"] = why
                            continue
                        fn = impls[impl].fn
                        calls[impl] = {
                            "pseudo_values": lambda fn=fn: fn(keys, grads, mean, std, 1e-6, EPS),
                            "stats_update": lambda fn=fn: fn(x, count, mean, m2, False),
                            "stats_update2": lambda fn=fn: fn(keys, grads, count, mean, m2, False),
                            "gram": lambda fn=fn: fn(keys, 1.0, True),
                        }[op]
                    moved = kernel_bytes_moved(op, n, d_in, d_out, keys.element_size())
                    row["bytes_moved"] = moved
                    results = {}
                    for impl, call in calls.items():
                        times = sorted(_time_ms(call, device, args.cpu_smoke))
                        med = _median(times)
                        row[f"{impl}_ms"] = med
                        row[f"{impl}_p20_ms"] = times[int(0.2 * (len(times) - 1))]
                        row[f"{impl}_p80_ms"] = times[int(0.8 * (len(times) - 1))]
                        row[f"{impl}_gbps"] = moved / (med * 1e-3) / 1e9
                        row[f"{impl}_frac_of_copy"] = row[f"{impl}_gbps"] / copy_gbps
                        res = call()
                        results[impl] = res[-1] if op.startswith("stats") else res
                    row["speedup_vs_torch"] = _ratio(row.get("torch_ms"), row.get("triton_ms"))
                    if len(results) == 2:
                        row["rel_diff_vs_torch"] = _rel_diff(results["triton"].float(),
                                                             results["torch"].float())
                    rows.append(row)
                    PARTIAL.setdefault("rows", rows)
                    del results, calls
                del keys, grads, x
            del keys32, grads32
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"device": str(device), "copy_gbps": copy_gbps, "copy_bytes": 2 * copy_numel * 4,
            "rows": rows, "skipped_cases": skipped,
            "skipped_reason": "the step's time budget ran out" if skipped else None}


# ------------------------------------------------------------------------------ cholesky
def step_cholesky(args, deadline: Deadline) -> Dict[str, Any]:
    import torch
    import ultraedit_kernels  # noqa: F401
    from ultraedit_kernels import _backends

    device = _device(args.cpu_smoke)
    native = "cpp" if device.type == "cpu" else "cuda"
    if args.cpu_smoke:
        cases = [("tiny turn, 3 modules", 3, 16, 24), ("tiny turn, 1 module", 1, 40, 32)]
    else:
        cases = [("Mistral-7B turn: 2 x down_proj", 2, 400, 4096),
                 ("Llama-3-8B turn: 12 x gate/up_proj", 12, 400, 14336),
                 ("Mistral-7B, N=2000", 2, 2000, 4096),
                 ("Llama-3-8B, N=2000", 12, 2000, 14336),
                 # the dispatch calibration's point that decides the Mistral turn (its batched
                 # class times 4 systems): does the CUDA kernel win there and lose at 2 x 400?
                 ("calibration point: 4 x 380 x 4100", 4, 380, 4100)]
    impls = _backends.implementations("spd_solve")
    why = impls[native].available(device)
    rows, skipped = [], []
    for label, batch, n, k in cases:
        if not deadline.allows(4):
            skipped.append(label)
            continue
        gen = torch.Generator(device).manual_seed(n + batch)
        x = torch.randn(batch, n, n + 8, generator=gen, dtype=torch.float64, device=device)
        a64 = x @ x.transpose(-1, -2) / n + torch.eye(n, dtype=torch.float64, device=device)
        b64 = torch.randn(batch, n, k, generator=gen, dtype=torch.float64, device=device)
        del x
        a, b = a64.float(), b64.float()
        ref = torch.cholesky_solve(b64, torch.linalg.cholesky(a64))
        row: Dict[str, Any] = {"case": label, "batch": batch, "n": n, "k": k,
                               "native": native, "auto_picks": _backends.select("spd_solve", device, a, b)[0]}
        for name in ("torch", native):
            if name == native and why is not None:
                row[f"{name}_unavailable"] = why
                continue
            fn = impls[name].fn
            times = _time_ms(lambda: fn(a, b), device, args.cpu_smoke)
            row[f"{name}_ms"] = _median(times)
            sol, info = fn(a, b)
            row[f"{name}_info_max"] = int(info.max())
            row[f"{name}_rel_err_vs_fp64"] = _rel_diff(sol, ref)
            work = batch * (n ** 3 / 3 + 2 * n * n * k)
            row[f"{name}_gflops"] = work / (row[f"{name}_ms"] * 1e-3) / 1e9
        row["speedup_vs_torch"] = _ratio(row.get("torch_ms"), row.get(f"{native}_ms"))
        rows.append(row)
        PARTIAL.setdefault("rows", rows)
        del a64, b64, a, b, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"device": str(device), "native": native, "native_unavailable": why, "rows": rows,
            "baseline": "torch.linalg.cholesky_ex + torch.cholesky_solve (batched; cuSOLVER on CUDA)",
            "skipped_cases": skipped,
            "skipped_reason": "the step's time budget ran out" if skipped else None}


# ------------------------------------------------------------------------------ turns
COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "Peru", "Chile", "Norway", "Kenya",
             "Egypt", "India", "China", "Brazil", "Canada", "Mexico", "Greece", "Turkey", "Iran",
             "Poland", "Sweden", "Finland", "Ireland", "Austria", "Hungary", "Portugal"]
CAPITALS = ["Paris", "Berlin", "Rome", "Madrid", "Tokyo", "Lima", "Santiago", "Oslo", "Nairobi",
            "Cairo", "New Delhi", "Beijing", "Brasilia", "Ottawa", "Mexico City", "Athens",
            "Ankara", "Tehran", "Warsaw", "Stockholm", "Helsinki", "Dublin", "Vienna",
            "Budapest", "Lisbon"]
TEMPLATES = ["The capital of {s} is", "{s}'s capital city is", "The seat of government of {s} is",
             "The largest city and capital of {s} is"]


def make_tokenizer():
    """A byte-level BPE tokenizer trained on the requests' vocabulary (no hub access)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [t.format(s=s) + " " + c for t in TEMPLATES for s, c in zip(COUNTRIES, CAPITALS)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=128)


def make_requests(n: int):
    """``n`` counterfactual capital edits (each subject gets another country's capital)."""
    out = []
    for i in range(n):
        s = COUNTRIES[i % len(COUNTRIES)]
        t = TEMPLATES[(i // len(COUNTRIES)) % len(TEMPLATES)]
        out.append({"prompt": t.format(s=s), "target": CAPITALS[(i * 7 + 3) % len(CAPITALS)],
                    "subject": s})
    return out


def _build_model(step: str, smoke: bool, device, dtype):
    import torch
    import transformers as tf
    from ultraedit.plan import BUILTIN_CONFIGS, load_config

    fields = SMOKE_MODELS[step] if smoke else BUILTIN_CONFIGS[TURN_MODELS[step][1]]
    cfg = load_config(dict(fields, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def step_turn(args, deadline: Deadline, step: str) -> Dict[str, Any]:
    import torch
    from ultraedit import UltraEditor
    from ultraedit.modules import paper_module_names
    from ultraedit.plan import plan_turn, request_shape
    from ultraedit.tokenization import encode_edit_batch

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import paper_baseline as paper
    from memory import PeakMemory

    device = _device(args.cpu_smoke)
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    edits = 20 if args.cpu_smoke else 100
    label = (f"tiny {SMOKE_MODELS[step]['model_type']} standing in for {TURN_MODELS[step][1]} "
             f"(cpu-smoke)") if args.cpu_smoke else TURN_MODELS[step][0]
    t0 = time.time()
    model = _build_model(step, args.cpu_smoke, device, dtype)
    build_s = time.time() - t0
    tok = make_tokenizer()
    requests = make_requests(edits)
    modules = paper_module_names(model)
    shape = request_shape(tok, requests, MICRO_BATCH)
    plan = plan_turn(model, dtype, modules, edits=edits, micro_batch=MICRO_BATCH, **shape)
    out: Dict[str, Any] = {
        "model": label, "model_type": model.config.model_type, "dtype": str(dtype).replace("torch.", ""),
        "device": str(device), "edits": edits, "micro_batch": MICRO_BATCH, "modules": modules,
        "n_parameters": sum(p.numel() for p in model.parameters()), "model_build_s": build_s,
        "request_shape": shape, "settings": dict(PAPER_SETTINGS),
        "plan": {"total_bytes": plan.total_bytes, "peak_phase": plan.peak_phase,
                 "fits_24gib": plan.fits, "items": [vars(i) for i in plan.items]},
    }
    PARTIAL["turn"] = out       # filled in as the step goes

    def batches():
        return [encode_edit_batch(tok, [r["prompt"] for r in requests[i:i + MICRO_BATCH]],
                                  [r["target"] for r in requests[i:i + MICRO_BATCH]], device=device)
                for i in range(0, len(requests), MICRO_BATCH)]

    # --- dispatch calibration first: the first auto dispatch of an op measures its grid once per
    # machine (cached), and inside a turn that transient would count as the turn's peak
    out["calibration"] = _calibrate_dispatch(device, PeakMemory)

    # --- the paper's path first (it leaves .grad on the edited weights: cleared after)
    paper_runs = []
    baseline = paper.PaperTurn(model, modules, lr=PAPER_SETTINGS["lr"], lam=1.0)
    try:
        for rnd in range(2):                   # round 0 warms up (allocator, cuBLAS, kernels)
            if rnd and not deadline.allows(3 * max(paper_runs[0]["turn_s"], 1.0)):
                out["paper_skipped"] = "the timed round does not fit in the step's budget"
                break
            timer = paper.StageTimer()
            with PeakMemory(device) as pm:
                base = _allocated(device, model)
                _sync(device)
                t1 = time.perf_counter()
                baseline.turn(batches(), timer)
                _sync(device)
                turn_s = time.perf_counter() - t1
            paper_runs.append({"turn_s": turn_s, "fwd_bwd_s": timer.seconds.get("forward_backward", 0.0),
                               "stages_s": dict(timer.seconds),
                               "peak_bytes": base + pm.peak_bytes, "peak_method": pm.method})
    finally:
        for name in modules:
            w = model.get_submodule(name).weight
            w.grad = None
            w.requires_grad_(False)
        del baseline
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    p = paper_runs[-1]
    out["paper"] = dict(p, rounds=len(paper_runs),
                        overhead_s=p["turn_s"] - p["fwd_bwd_s"],
                        overhead_share=_ratio(p["turn_s"] - p["fwd_bwd_s"], p["turn_s"]))

    # --- the editor: construction + two turns (the first warms up and fills the history)
    reports = []
    phase_peaks: List[Optional[int]] = []   # CUDA: construction's peak, then each turn's
    with PeakMemory(device) as pm:
        base = _allocated(device, model)
        editor = UltraEditor(model, tok, modules=modules, micro_batch=MICRO_BATCH,
                             backward_group=1, **PAPER_SETTINGS)
        for rnd in range(2):
            if rnd and not deadline.allows(3 * max(reports[0].turn_s, 1.0)):
                out["editor_skipped"] = "the second (timed) turn does not fit in the step's budget"
                break
            phase_peaks.append(pm.phase_peak())
            reports.append(editor.edit(requests))
        phase_peaks.append(pm.phase_peak())
    r = reports[-1]
    # CUDA: the largest phase's peak (the stats are reset between phases); CPU: PeakMemory's
    phase_peaks = [p for p in phase_peaks if p is not None]
    measured = base + (max(phase_peaks) if phase_peaks else pm.peak_bytes)
    out["editor"] = {"turn_s": r.turn_s, "fwd_bwd_s": r.fwd_bwd_s, "editor_s": r.editor_s,
                     "editor_share": _ratio(r.editor_s, r.turn_s), "n_tokens": r.n_tokens,
                     "rounds": len(reports), "first_turn_s": reports[0].turn_s,
                     "peak_bytes": measured, "peak_method": pm.method,
                     # where the peak falls: construction, first turn (which also warms up the
                     # kernels and may calibrate dispatch), second turn
                     "phase_peak_bytes": [base + b for b in phase_peaks] or None,
                     "turn_report_peak_bytes": r.peak_bytes, "turn_report_peak_source": r.peak_source}
    out["ratios"] = {
        "turn_speedup_vs_paper": _ratio(p["turn_s"], r.turn_s),
        "fwd_bwd_ratio_vs_paper": _ratio(r.fwd_bwd_s, p["fwd_bwd_s"]),
        "overhead_ratio_vs_paper": _ratio(r.editor_s, p["turn_s"] - p["fwd_bwd_s"]),
        "peak_ratio_vs_paper": _ratio(measured, p["peak_bytes"]),
        "plan_vs_measured": _ratio(plan.total_bytes, measured),
    }
    del editor           # its base copy and history are freed before the next editor's
    out["auto"] = _variant_turns(model, tok, modules, requests, device, deadline, r, measured,
                                 micro_batch="auto")
    # one vocabulary projection and one backward for the turn's micro-batches of 10
    # (backward_group; "auto" groups a CUDA turn only when it packs: this alone measured
    # 0.95-1.14x on an H200)
    out["grouped"] = _variant_turns(model, tok, modules, requests, device, deadline, r, measured,
                                    micro_batch=MICRO_BATCH,
                                    backward_group=-(-edits // MICRO_BATCH), pack="off")
    # ... and those micro-batches as one packed sequence of their tokens (pack="on")
    out["packed"] = _variant_turns(model, tok, modules, requests, device, deadline, r, measured,
                                   micro_batch=MICRO_BATCH,
                                   backward_group=-(-edits // MICRO_BATCH), pack="on")
    # the defaults (backward_group="auto", pack="auto"): what a user's turn does on this device
    out["defaults"] = _variant_turns(model, tok, modules, requests, device, deadline, r,
                                     measured, micro_batch=MICRO_BATCH)
    # micro_batch="auto"'s one forward packed (pack="on"): whether "auto" should pack a single
    # micro-batch on a GPU too (it does not: not measured)
    out["auto_packed"] = _variant_turns(model, tok, modules, requests, device, deadline, r,
                                        measured, micro_batch="auto", pack="on")
    return out


def _calibrate_dispatch(device, peak_memory) -> Dict[str, Any]:
    """Measure the dispatch calibration of ``device``'s ops not cached yet (nothing when
    ``ULTRAEDIT_CALIBRATION`` is not ``auto``/``refresh``): its seconds and its own peak bytes,
    the once-per-machine cost a user's first turn pays."""
    from ultraedit_kernels import _backends, calibration
    if calibration.mode() not in ("auto", "refresh", ""):
        return {"skipped": f"ULTRAEDIT_CALIBRATION={calibration.mode()}"}
    data = calibration.current(device) or {}
    ops = [op for op in calibration.GRIDS
           if op in _backends.registered_ops() and calibration.candidates(op, device)
           and set(calibration.GRIDS[op]) - set(data.get("ops", {}).get(op, {}).get("grid", {}))]
    if not ops:
        return {"ops": [], "seconds": 0.0, "peak_bytes": 0, "cached": True}
    t0 = time.perf_counter()
    with peak_memory(device) as pm:
        calibration.calibrate(device, ops)
    return {"ops": ops, "seconds": time.perf_counter() - t0, "peak_bytes": pm.peak_bytes,
            "cached": False}


def _variant_turns(model, tok, modules, requests, device, deadline, r10, peak10, **settings):
    """An editor with other ``settings`` (``micro_batch="auto"``: as many requests per forward
    as the memory allows, the paper's per-10-request losses; ``backward_group``: micro-batches
    sharing one backward) beside the paper's 10-request turn ``r10``: its second turn's time,
    the micro-batch and group it used, its peak, the plan ``auto`` chose by, and the gains."""
    import torch
    from memory import PeakMemory   # bench/ is on the path (step_turn)
    from ultraedit import UltraEditor

    gc.collect()          # the previous editor's base copy and history are freed first
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not deadline.allows(2.5 * max(r10.turn_s, 1.0)):
        return {"skipped": "two more turns do not fit in the step's budget"}
    reports = []
    with PeakMemory(device) as pm:
        base = _allocated(device, model)
        editor = UltraEditor(model, tok, modules=modules, **settings, **PAPER_SETTINGS)
        for rnd in range(2):
            if rnd and not deadline.allows(3 * max(reports[0].turn_s, 1.0)):
                break
            reports.append(editor.edit(requests))
    a = reports[-1]
    measured = base + pm.peak_bytes
    plan = editor.sizer.last_plan if editor.sizer is not None else None
    return {"micro_batch": a.micro_batch, "backward_group": a.backward_group,
            "packed": a.packed, "turn_s": a.turn_s, "fwd_bwd_s": a.fwd_bwd_s,
            "editor_s": a.editor_s, "rounds": len(reports), "first_turn_s": reports[0].turn_s,
            "peak_bytes": measured, "peak_method": pm.method,
            "plan_bytes": plan.total_bytes if plan is not None else None,
            "budget_bytes": plan.budget_bytes if plan is not None else None,
            "edits_per_s": len(requests) / a.turn_s, "edits_per_s_10": len(requests) / r10.turn_s,
            "throughput_gain_vs_10": _ratio(r10.turn_s, a.turn_s),
            "fwd_bwd_gain_vs_10": _ratio(r10.fwd_bwd_s, a.fwd_bwd_s),
            "peak_ratio_vs_10": _ratio(measured, peak10),
            "plan_vs_measured": _ratio(plan.total_bytes, measured) if plan is not None else None}


def _allocated(device, model) -> int:
    """Bytes allocated now: CUDA's live bytes; on the CPU the model's parameters and buffers
    (the profiler counts only what is allocated inside the measured block)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


STEP_FUNCS = {"build": step_build, "env": step_env, "gpu_tests": step_gpu_tests,
              "kernels": step_kernels, "cholesky": step_cholesky}


PARTIAL: Dict[str, Any] = {}     # what a step has measured so far (kept if it is stopped)


def _terminated(signum, frame):
    raise TimeoutError("stopped by the run: the step's time budget ran out")


def run_step(args) -> int:
    """Child process: run one step, write ``steps/<step>.json`` (result or error)."""
    signal.signal(signal.SIGTERM, _terminated)
    deadline = Deadline(args.deadline)
    path = os.path.join(args.out, "steps", f"{args.step}.json")
    t0 = time.time()
    record: Dict[str, Any] = {"step": args.step, "started_utc": _now()}
    try:
        # injected faults, for the tests of the run itself
        if os.environ.get("ULTRAEDIT_ACCEPTANCE_FAIL") == args.step:
            raise RuntimeError(f"failure injected into step {args.step!r} "
                               f"(ULTRAEDIT_ACCEPTANCE_FAIL)")
        if os.environ.get("ULTRAEDIT_ACCEPTANCE_HANG") == args.step:
            PARTIAL["injected"] = "hang"
            time.sleep(3600)
        if args.step.startswith("turn_"):
            result = step_turn(args, deadline, args.step)
        else:
            result = STEP_FUNCS[args.step](args, deadline)
        record.update(status="ok", result=result)
        rc = 0
    except BaseException as err:  # noqa: BLE001 - every failure is recorded, then reported
        record.update(status="failed", error=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc()[-4000:], partial=PARTIAL)
        rc = 1
    record["seconds"] = time.time() - t0
    _write_json(path, record)
    return rc


# ------------------------------------------------------------------------------ the run
def run_all(args) -> int:
    os.makedirs(os.path.join(args.out, "steps"), exist_ok=True)
    budgets = SMOKE_BUDGETS if args.cpu_smoke else BUDGETS
    steps = [s for s in STEPS if not args.steps or s in args.steps.split(",")]
    start = time.time()
    deadline = start + args.budget_s
    report: Dict[str, Any] = {"schema": SCHEMA, "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
                              "started_utc": _now(), "budget_s": args.budget_s,
                              "command": " ".join(["bash scripts/gpu_acceptance.sh"] + args.argv),
                              "steps": {}}
    child_env = dict(os.environ)
    if not args.cpu_smoke:   # real kernel launches: never the interpreter on a GPU
        child_env.pop("TRITON_INTERPRET", None)
    carry = 0.0
    for step in steps:
        left = deadline - time.time()
        budget = budgets[step]
        entry: Dict[str, Any] = {"budget_s": budget}
        report["steps"][step] = entry
        if left < MIN_STEP_S:
            entry.update(status="skipped", seconds=0.0,
                         reason=f"{left:.0f} s left of the run's {args.budget_s:.0f} s budget")
            print(f"[{step}] skipped: {entry['reason']}", flush=True)
            continue
        allowed = min(budget + carry, left)
        print(f"[{step}] up to {allowed:.0f} s", flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--step", step, "--out", args.out,
               "--deadline", str(time.time() + allowed)]
        if args.cpu_smoke:
            cmd.append("--cpu-smoke")
        t0 = time.time()
        log_path = os.path.join(args.out, "steps", f"{step}.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=child_env)
            try:
                rc = proc.wait(timeout=allowed + 5)
            except subprocess.TimeoutExpired:   # SIGTERM: the step records what it has
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc = None
        seconds = time.time() - t0
        carry = max(0.0, budget + carry - seconds)
        result_path = os.path.join(args.out, "steps", f"{step}.json")
        if rc is None:
            entry.update(status="timeout", seconds=seconds,
                         error=f"stopped after {seconds:.0f} s (budget {allowed:.0f} s)")
            if os.path.exists(result_path):
                with open(result_path) as fh:
                    entry["partial"] = json.load(fh).get("partial")
        elif os.path.exists(result_path):
            with open(result_path) as fh:
                rec = json.load(fh)
            entry.update(status=rec["status"], seconds=seconds)
            if rec["status"] == "ok":
                report[step] = rec["result"]
                for key in ("skipped_reason", "paper_skipped", "editor_skipped"):
                    if rec["result"].get(key):
                        entry["note"] = rec["result"][key]
            else:
                entry.update(error=rec.get("error"), traceback=rec.get("traceback"),
                             partial=rec.get("partial"))
        else:
            with open(log_path) as fh:
                tail = fh.read()[-1500:]
            entry.update(status="failed", seconds=seconds,
                         error=f"the step's process exited {rc} without a result: {tail}")
        print(f"[{step}] {entry['status']} in {seconds:.1f} s"
              + (f": {entry.get('error')}" if entry.get("error") else ""), flush=True)
    report["finished_utc"] = _now()
    report["wall_s"] = time.time() - start
    report["turns"] = [dict(report[s], step=s) for s in steps if s.startswith("turn_") and s in report]
    env = report.get("env", {})
    report["card"] = env.get("card")
    report["versions"] = {k: env.get(k) for k in ("torch", "torch_cuda", "triton", "transformers",
                                                  "python", "driver")}
    _write_json(os.path.join(args.out, "acceptance.json"), report)
    with open(os.path.join(args.out, "acceptance.md"), "w") as fh:
        fh.write(markdown(report))
    failed = [s for s, e in report["steps"].items() if e["status"] in ("failed", "timeout")]
    print(f"wrote {args.out}/acceptance.json and acceptance.md in {report['wall_s']:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


# ------------------------------------------------------------------------------ markdown
def _f(v, fmt="{:.3g}", none="–"):
    if v is None or (isinstance(v, float) and v != v):
        return none
    return fmt.format(v)


def _x(v):
    return _f(v, "{:.2f}x")


def _beside_rows(rep: Dict[str, Any], key: str, cells: Callable, columns: int) -> List[str]:
    """One table row per turn step for the variant ``key`` beside the 10-request turn: the
    model, then ``cells(turn, variant)``, or why the variant did not run."""
    rows = []
    for r in rep["turns"]:
        v = r.get(key) or {}
        if "turn_s" not in v:
            rows.append(f"| {r['model']} | {v.get('skipped', 'not run')} |" + "  |" * (columns - 2))
        else:
            rows.append(f"| {r['model']} ({r['dtype']}) | {cells(r, v)} |")
    return rows


def _group_cells(r: Dict[str, Any], g: Dict[str, Any]) -> str:
    """The cells of a variant that shares one backward among the turn's micro-batches."""
    gib = 1 << 30
    return (f"{g['backward_group']} | {g['turn_s']:.3f} ({r['editor']['turn_s']:.3f}) | "
            f"{_x(g['throughput_gain_vs_10'])} | {_x(g['fwd_bwd_gain_vs_10'])} | "
            f"{g['peak_bytes'] / gib:.3f} ({r['editor']['peak_bytes'] / gib:.3f})")


def _phase_cells(r: Dict[str, Any]) -> str:
    """Cells of a turn step: the editor's peak per phase, the calibration's seconds and peak."""
    gib = 1 << 30
    phases = r["editor"].get("phase_peak_bytes")
    cal = r.get("calibration") or {}
    peaks = " / ".join(f"{b / gib:.3f}" for b in phases) if phases else "–"
    seconds = _f(cal["seconds"], "{:.1f}") if "seconds" in cal else cal.get("skipped", "–")
    peak = _f(cal["peak_bytes"] / gib, "{:.3f}") if cal.get("peak_bytes") is not None else "–"
    return f"{peaks} | {seconds} | {peak}"


def _default_cells(r: Dict[str, Any], g: Dict[str, Any]) -> str:
    """The cells of the variant with ``backward_group`` and ``pack`` at their defaults."""
    group, rest = _group_cells(r, g).split(" | ", 1)
    return f"{group} | {'yes' if g['packed'] else 'no'} | {rest}"


def markdown(rep: Dict[str, Any]) -> str:
    env = rep.get("env", {})
    v = rep.get("versions", {})
    lines = [f"# GPU acceptance: {rep.get('card') or 'unknown device'} ({rep['mode']})", "",
             f"torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), triton {v.get('triton')}, "
             f"transformers {v.get('transformers')}, Python {v.get('python')}, driver "
             f"{v.get('driver')}; {env.get('cpu_count')} CPU cores ({env.get('cpu')}).",
             f"Run {rep['started_utc']} in {rep.get('wall_s', 0):.0f} s of a {rep['budget_s']:.0f} s "
             f"budget: `{rep['command']}`.", "", "## Steps", "",
             "| step | status | seconds | budget s | note |", "|---|---|---|---|---|"]
    for name, e in rep["steps"].items():
        note = e.get("error") or e.get("reason") or e.get("note") or ""
        lines.append(f"| {name} | {e['status']} | {_f(e.get('seconds'), '{:.1f}')} | "
                     f"{e['budget_s']} | {str(note)[:200].replace('|', '/')} |")
    b = rep.get("build")
    if b:
        lines += ["", f"Build: `{b['command']}`, MAX_JOBS={b['max_jobs']}, arch {b.get('cuda_arch')}, "
                      f"{b['seconds']:.0f} s, compiled: {b.get('compiled')}."]
    t = rep.get("gpu_tests")
    if t:
        lines += ["", f"GPU-marked tests: {t['passed']} passed, {t['failures'] + t['errors']} failed, "
                      f"{t['skipped']} skipped (`{t['command']}`)."
                  + (f" Failed: {', '.join(t['failed'])}" if t["failed"] else "")]
    k = rep.get("kernels")
    if k:
        lines += ["", "## Triton kernels vs the torch path", "",
                  f"Device-to-device copy: {k['copy_gbps']:.0f} GB/s (read + write). Times are "
                  f"medians; GB/s counts every input read once and every output written once.", "",
                  "| op | dtype | d_in -> d_out | N | triton ms | torch ms | speed-up | triton GB/s "
                  "(of copy) | torch GB/s (of copy) | rel. diff |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in k["rows"]:
            lines.append(
                f"| {r['op']} | {r['dtype']} | {r['d_in']} -> {r['d_out']} | {r['n']} | "
                f"{_f(r.get('triton_ms'))} | {_f(r.get('torch_ms'))} | {_x(r.get('speedup_vs_torch'))} | "
                f"{_f(r.get('triton_gbps'))} ({_f(r.get('triton_frac_of_copy'), '{:.0%}')}) | "
                f"{_f(r.get('torch_gbps'))} ({_f(r.get('torch_frac_of_copy'), '{:.0%}')}) | "
                f"{_f(r.get('rel_diff_vs_torch'), '{:.1e}')} |")
        if k.get("skipped_cases"):
            lines.append(f"\nSkipped (budget): {', '.join(k['skipped_cases'])}")
    c = rep.get("cholesky")
    if c:
        nat = c["native"]
        lines += ["", f"## Cholesky solve: {nat} build vs {c['baseline']}", ""]
        if c.get("native_unavailable"):
            lines.append(f"The {nat} build is unavailable: {c['native_unavailable']}\n")
        lines += [f"| case | batch | n | k | {nat} ms | torch ms | speed-up | {nat} err | torch err "
                  f"| auto picks |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in c["rows"]:
            lines.append(f"| {r['case']} | {r['batch']} | {r['n']} | {r['k']} | "
                         f"{_f(r.get(nat + '_ms'))} | {_f(r.get('torch_ms'))} | "
                         f"{_x(r.get('speedup_vs_torch'))} | "
                         f"{_f(r.get(nat + '_rel_err_vs_fp64'), '{:.1e}')} | "
                         f"{_f(r.get('torch_rel_err_vs_fp64'), '{:.1e}')} | {r['auto_picks']} |")
    if rep.get("turns"):
        lines += ["", "## One lifelong turn: this editor vs the paper's path (same process)", "",
                  "Paper settings (lr 1e-6, answer positions, one step, the paper's modules), "
                  "micro-batches of 10; the editor's second turn (the first warms up and fills "
                  "the rollback history). Peak: max_memory_allocated over construction + turns "
                  "(CPU: allocator events).", "",
                  "| model | edits | modules | turn s (paper) | speed-up | editor share (paper's "
                  "overhead share) | peak GiB (paper) | peak ratio | plan GiB | plan / measured |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        gib = 2 ** 30
        for r in rep["turns"]:
            e, p, q = r["editor"], r["paper"], r["ratios"]
            lines.append(
                f"| {r['model']} ({r['dtype']}) | {r['edits']} | {len(r['modules'])} | "
                f"{e['turn_s']:.3f} ({p['turn_s']:.3f}) | {_x(q['turn_speedup_vs_paper'])} | "
                f"{_f(e['editor_share'], '{:.1%}')} ({_f(p['overhead_share'], '{:.1%}')}) | "
                f"{e['peak_bytes'] / gib:.3f} ({p['peak_bytes'] / gib:.3f}) | "
                f"{_x(q['peak_ratio_vs_paper'])} | {r['plan']['total_bytes'] / gib:.3f} | "
                f"{_x(q['plan_vs_measured'])} |")
        lines += ["", "Where the editor's peak falls (CUDA: the peak of each phase apart) and the "
                  "dispatch calibration measured before the turns (once per machine: a user's "
                  "first turn pays it).", "",
                  "| model | peak GiB: construction / first turn / second turn | calibration s | "
                  "calibration peak GiB |", "|---|---|---|---|"]
        lines += [f"| {r['model']} ({r['dtype']}) | {_phase_cells(r)} |" for r in rep["turns"]]
        lines += ["", "### micro_batch=\"auto\" beside the 10-request turn", "",
                  "The same editor settings with `micro_batch=\"auto\"`: as many requests per "
                  "forward as the memory budget allows (by `ultraedit.plan`), each request's loss "
                  "weighted so the gradients are the paper's 10-request means.", "",
                  "| model | auto micro-batch | turn s (10) | throughput gain | fwd+bwd gain | "
                  "edits/s (10) | peak GiB (10) | plan GiB / measured |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += _beside_rows(rep, "auto", lambda r, a: (
            f"{a['micro_batch']} | {a['turn_s']:.3f} ({r['editor']['turn_s']:.3f}) | "
            f"{_x(a['throughput_gain_vs_10'])} | {_x(a['fwd_bwd_gain_vs_10'])} | "
            f"{a['edits_per_s']:.1f} ({a['edits_per_s_10']:.1f}) | "
            f"{a['peak_bytes'] / gib:.3f} ({r['editor']['peak_bytes'] / gib:.3f}) | "
            f"{_f(a['plan_bytes'] / gib if a['plan_bytes'] else None)} / "
            f"{_x(a['plan_vs_measured'])}"), 8)
        lines += ["", "### One backward for the turn's micro-batches beside the 10-request turn", "",
                  "The same editor settings with `backward_group` = the turn's micro-batches of 10: "
                  "one vocabulary projection and one backward for all of them (the same "
                  "gradients; `auto` groups a turn on a GPU only when it packs).", "",
                  "| model | group | turn s (10) | throughput gain | fwd+bwd gain | peak GiB (10) |",
                  "|---|---|---|---|---|---|"]
        lines += _beside_rows(rep, "grouped", _group_cells, 6)
        lines += ["", "### One packed forward for the turn's micro-batches beside the 10-request "
                  "turn", "",
                  "The same editor settings with `backward_group` = the turn's micro-batches of 10 "
                  "and `pack=\"on\"`: their requests' tokens as one sequence, no padding, "
                  "attention per request (the same gradients up to rounding).", "",
                  "| model | group | turn s (10) | throughput gain | fwd+bwd gain | peak GiB (10) |",
                  "|---|---|---|---|---|---|"]
        lines += _beside_rows(rep, "packed", _group_cells, 6)
        lines += ["", "### The defaults beside the 10-request turn", "",
                  "The same editor settings with `backward_group` and `pack` left at `auto`: "
                  "the group and packing a user's turn gets on this device.", "",
                  "| model | group | packed | turn s (10) | throughput gain | fwd+bwd gain | "
                  "peak GiB (10) |", "|---|---|---|---|---|---|---|"]
        lines += _beside_rows(rep, "defaults", _default_cells, 7)
        lines += ["", "### micro_batch=\"auto\" packed beside the 10-request turn", "",
                  "`micro_batch=\"auto\"` with `pack=\"on\"`: its forwards' requests as one "
                  "sequence each, no padding (on a GPU `auto` does not pack a lone micro-batch "
                  "yet).", "",
                  "| model | group | packed | turn s (10) | throughput gain | fwd+bwd gain | "
                  "peak GiB (10) |", "|---|---|---|---|---|---|---|"]
        lines += _beside_rows(rep, "auto_packed", _default_cells, 7)
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="scripts/gpu_acceptance.sh", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="whole-run budget in seconds (default 480; --cpu-smoke 240)")
    p.add_argument("--steps", default="", help="comma-separated subset of: " + ",".join(STEPS))
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    args.out = os.path.abspath(args.out)
    if args.step:
        return run_step(args)
    if args.budget_s is None:
        args.budget_s = 240.0 if args.cpu_smoke else 480.0
    unknown = [s for s in args.steps.split(",") if s and s not in STEPS]
    if unknown:
        p.error(f"unknown steps {unknown}; known: {STEPS}")
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())

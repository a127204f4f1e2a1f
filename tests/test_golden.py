"""Golden tests: what the editor computes, recorded once, compared on every run.

Each case builds an editor on a seeded model, runs two turns and compares with the recording
in ``tests/golden/``: the edited weights, the normalizer statistics, the key memory, the
preserved keys, the fp32 delta record and the TurnReport numbers (not timings).

Bit-identity is asserted when the machine's numerical fingerprint (CPU model, torch version and
build configuration, backend selection and calibration) equals the one stored with the recording.
On another machine BLAS kernels may round differently, so there every float tensor is compared
with the tolerance rule below and every count exactly.

Re-record (only when a change of the computed numbers is intended)::

    UE_GOLDEN_RECORD=1 TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python -m pytest -q tests/test_golden.py
"""
import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch

from _same_turns import FACTS
from conftest import ue_tiny_model
from tolerances import SOLVE, rel_err

GOLDEN = Path(__file__).parent / "golden"
RECORD = os.environ.get("UE_GOLDEN_RECORD") == "1"


def golden_rtol(reports):
    """The tolerance rule off the recording machine: relative Frobenius error of every float
    tensor (of a weight's change ΔW = W - W0, not of W) against the recording, at most the
    float32 solve tolerance (``tolerances.SOLVE["dual"]``) per solve the case chained (steps
    of all turns: each step's keys come from the weights the previous steps changed)."""
    return SOLVE["dual"] * sum(r["steps_run"] for r in reports)


LLAMA_MODULES = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.up_proj",
                 "model.layers.2.mlp.down_proj"]
GPT2_MODULES = ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_proj"]
REQUESTS = FACTS
TURNS = [REQUESTS[0:5], REQUESTS[3:8]]
SUBJECTS = ["France", "Spain", "New York", "Lima", "Kenya"]
PAPER = dict(positions="answer", steps=1, hold_done=False, memory=0.0, preserve=0.0,
             protect_mean=0.0)
CONFIGS = {
    "paper": dict(PAPER, lr=1e-3, micro_batch=3),
    "official": dict(compat="official", lr=1e-3, micro_batch=3),
    "subject": dict(positions="subject", steps=3, hold_done=True, memory=4.0, preserve=0.3,
                    preserve_subjects=SUBJECTS, protect_mean=0.0, lr=2e-2, micro_batch=3),
    "protect": dict(PAPER, steps=3, hold_done=True, protect_mean=0.5, lr=2e-2, micro_batch=3),
    "protect_memory": dict(PAPER, memory=2.0, protect_mean=0.5, lr=1e-3, micro_batch=3,
                           normalizer="module"),
    "whiten": dict(PAPER, whiten=1e-2, steps=2, hold_done=True, lr=2e-2, micro_batch=3),
}
# "-held": a logit bias makes the model predict one word everywhere, and each turn's first request
# targets that word, so hold_done holds its rows from the first step on
TINY = ([(kind, cfg) for kind in ("llama", "gpt2") for cfg in CONFIGS]
        + [("llama-bf16", "paper"), ("llama-held", "subject"), ("llama-held", "protect"),
           ("gpt2-held", "protect")])
EMBEDDED_TURNS = [
    [("The capital of France is", "Rome", "France"),
     ("The capital of Japan is", "Berlin", "Japan"),
     ("The capital of Kenya is", "Oslo", "Kenya")],
    [("The capital of Peru is", "Madrid", "Peru"),
     ("The capital of Canada is", "Cairo", "Canada"),
     ("The capital of Italy is", "Lima", "Italy")],
]
EMBEDDED_PRESERVE = ["France", "Germany", "Tokyo", "Brazil", "Lima"]
REPORT_FIELDS = ("n_edits", "n_tokens", "n_modules", "steps_run", "n_predicted", "capture_bytes")


def fingerprint():
    """What decides the rounding of this machine's results (stored with every recording). The
    cases run on one thread; on the CPU ``auto`` never picks the Triton interpreter."""
    cpu = {"processor": platform.processor()}
    try:  # the first processor's identity: model, family/model/stepping, cache, feature flags
        for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
            key, _, value = (x.strip() for x in line.partition(":"))
            if key in ("vendor_id", "model name", "cpu family", "model", "stepping",
                       "microcode", "cache size"):
                cpu[key] = value
            elif key == "flags":
                cpu[key] = hashlib.sha256(value.encode()).hexdigest()[:16]
    except OSError:
        pass
    from ultraedit_kernels import _extension

    return {"cpu": cpu, "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "torch": torch.__version__,
            "torch_config": hashlib.sha256(torch.__config__.show().encode()).hexdigest(),
            "backend": os.environ.get("ULTRAEDIT_BACKEND", "auto"),
            # auto dispatch follows the machine's calibration unless it is off (the test default)
            "calibration": os.environ.get("ULTRAEDIT_CALIBRATION", "auto"),
            "cpp_extension": _extension.unavailable_reason("cpu") is None}


def sha(t):
    flat = t.detach().contiguous().reshape(-1).cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def requests(turn, subjects):
    return [{"prompt": p, "target": t, **({"subject": s} if subjects else {})} for p, t, s in turn]


def editor_tensors(ed):
    """Every tensor the golden test compares: ``{name: tensor}`` (ΔW = W - W0 is formed at
    comparison time from ``base.*``); key memories under ``stats.memory:<module>.*``, gradient
    covariances under ``stats.whitening:<stats key>.*``."""
    out = {}
    for name, module in ed.modules.items():
        out[f"weight.{name}"] = module.weight.detach()
        out[f"base.{name}"] = ed.journal.base[name]
        d = ed.journal.delta.get(name)
        if d is not None:
            out[f"delta.{name}"] = d
    for key, st in ed.state.stats.items():
        for part, t in st.state_dict().items():
            out[f"stats.{key}.{part}"] = t
    for name, mem in ed.state.memory.items():
        for part, t in mem.state_dict().items():
            out[f"stats.memory:{name}.{part}"] = t
    for name, pk in ed.state.preserved.items():
        out[f"preserved.{name}"] = pk.keys
    for key, cov in ed.state.whitening.items():
        for part, t in cov.state_dict().items():
            out[f"stats.whitening:{key}.{part}"] = t
    return out


def report_numbers(rep):
    return {**{f: getattr(rep, f) for f in REPORT_FIELDS}, "loss": rep.loss, "turn": rep.turn}


def tiny_case(kind, cfg_name, tokenizer):
    from ultraedit import UltraEditor

    torch.set_num_threads(1)
    base_kind = kind.split("-")[0]
    model = ue_tiny_model(base_kind, len(tokenizer), seed=5)
    if kind.endswith("bf16"):
        model = model.to(torch.bfloat16)
    turns = TURNS
    if kind.endswith("held"):
        from test_editor_hold_positions import force_prediction

        word = force_prediction(model, tokenizer)
        turns = [[(turn[0][0], word, turn[0][2])] + turn[1:] for turn in TURNS]
    cfg = CONFIGS[cfg_name]
    mods = LLAMA_MODULES if base_kind == "llama" else GPT2_MODULES
    ed = UltraEditor(model, tokenizer, modules=mods, **cfg)
    out, reports = {}, []
    for t, turn in enumerate(turns):
        reports.append(report_numbers(ed.edit(requests(turn, cfg.get("positions") == "subject"))))
        for k, v in editor_tensors(ed).items():
            out[f"turn{t}.{k}"] = v.detach().cpu().clone()
    return out, reports, ed


def embedded_case(model, tok, restore):
    from ultraedit import UltraEditor

    torch.set_num_threads(1)
    ed = UltraEditor(model, tok, preserve_subjects=EMBEDDED_PRESERVE)
    restore(model, list(ed.modules))
    gen = torch.Generator().manual_seed(0)
    out, reports = {}, []
    for t, turn in enumerate(EMBEDDED_TURNS):
        reports.append(report_numbers(ed.edit(requests(turn, True))))
        for k, v in editor_tensors(ed).items():
            out[f"turn{t}.{k}"] = v.detach().cpu().clone()  # the state may change in place
    # full tensors only through their sha256; a fixed random projection of each for tolerances
    projected, shas = {}, {}
    for k, v in out.items():
        shas[k] = sha(v)
        if ".base." in k or not k.startswith(f"turn{len(TURNS) - 1}."):
            continue
        v = v.double()
        if ".weight." in k:  # ΔW·r
            v = v - out[k.replace(".weight.", ".base.")].double()
        if v.dim() == 2:
            r = torch.randn(v.shape[1], generator=gen, dtype=torch.float64)
            projected[k] = torch.cat([v @ r, v.norm().reshape(1)])
        else:
            projected[k] = v
    return projected, shas, reports, ed


def _settings(ed):
    keys = ("lr", "ridge", "micro_batch", "compat", "normalizer", "steps", "hold_done",
            "positions", "memory", "preserve", "protect_mean")
    whiten = {"whiten": ed.whiten} if ed.whiten else {}   # (recordings from before it: none)
    return {k: getattr(ed, k) for k in keys} | whiten | {"modules": list(ed.modules)}


def stored(tensors):
    """The tensors kept in the recording (sha256 covers all): the last turn's, without the base
    weights (the seeded model's own, compared by sha256 and used to form ΔW)."""
    last = f"turn{len(TURNS) - 1}."
    return {k: shrink(v) for k, v in tensors.items() if k.startswith(last) and ".base." not in k}


def shrink(v):
    """Matrices above 4,096 elements are kept as ``[v @ r, ||v||]`` (float64, fixed ``r``)."""
    if v.dim() != 2 or v.numel() <= 4096:
        return v
    r = torch.randn(v.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.cat([v.double() @ r, v.double().norm().reshape(1)])


def save_recording(name, tensors, shas, reports, settings):
    from safetensors.torch import save_file

    GOLDEN.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in stored(tensors).items()},
              str(GOLDEN / f"{name}.safetensors"))
    meta = {"fingerprint": fingerprint(), "reports": reports, "settings": settings,
            "sha256": shas}
    (GOLDEN / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def compare(name, tensors, shas, reports, settings):
    from safetensors.torch import load_file

    meta = json.loads((GOLDEN / f"{name}.json").read_text())
    ref = load_file(str(GOLDEN / f"{name}.safetensors"))
    exact = meta["fingerprint"] == fingerprint()
    rtol = golden_rtol(meta["reports"])
    assert settings == meta["settings"], f"{name}: the case's settings changed"
    assert len(reports) == len(meta["reports"])
    for got, want in zip(reports, meta["reports"]):
        for f in REPORT_FIELDS + ("turn",):
            assert got[f] == want[f], f"{name}: TurnReport.{f} {got[f]} != {want[f]}"
        if exact:
            assert got["loss"] == want["loss"], f"{name}: loss {got['loss']!r} != {want['loss']!r}"
        else:
            assert abs(got["loss"] - want["loss"]) <= rtol * abs(want["loss"])
    assert set(shas) == set(meta["sha256"]), f"{name}: other tensors than recorded"
    assert set(stored(tensors)) == set(ref)
    for k in shas:
        if exact or ".base." in k:
            assert shas[k] == meta["sha256"][k], f"{name}: {k} is not bit-identical"
    small = stored(tensors)
    for k, want in ref.items():
        got = small[k]
        assert got.dtype == want.dtype and got.shape == want.shape, f"{name}: {k}"
        if exact:
            assert torch.equal(got, want), f"{name}: {k} is not bit-identical"
        elif not got.dtype.is_floating_point or k.endswith(".count"):
            assert torch.equal(got, want), f"{name}: {k}"
        else:
            base_key = k.replace(".weight.", ".base.")
            if ".weight." in k and base_key in tensors and got.shape == tensors[base_key].shape:
                base = tensors[base_key].double()  # compare ΔW, not W
                got, want = got.double() - base, want.double() - base
            err = rel_err(got, want)
            assert err <= rtol, f"{name}: {k} relative error {err:.2e} > {rtol:g}"


@pytest.mark.parametrize("kind,cfg_name", TINY, ids=[f"{k}-{c}" for k, c in TINY])
def test_tiny_model_turns_match_the_recording(kind, cfg_name, ue_tokenizer):
    saved = torch.get_num_threads()
    try:
        tensors, reports, ed = tiny_case(kind, cfg_name, ue_tokenizer)
    finally:
        torch.set_num_threads(saved)
    shas = {k: sha(v) for k, v in tensors.items()}
    name = f"{kind}-{cfg_name}"
    if RECORD:
        save_recording(name, tensors, shas, reports, _settings(ed))
    compare(name, tensors, shas, reports, _settings(ed))


@pytest.mark.embedded
def test_embedded_default_turns_match_the_recording(ue_embedded, ue_restore):
    model, tok = ue_embedded
    projected, shas, reports, ed = embedded_case(model, tok, ue_restore)
    if RECORD:
        save_recording("embedded-default", projected, shas, reports, _settings(ed))
    compare("embedded-default", projected, shas, reports, _settings(ed))

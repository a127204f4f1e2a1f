"""The GPU acceptance run's code paths, on the CPU at tiny sizes (``--cpu-smoke``).

``bash scripts/gpu_acceptance.sh --cpu-smoke --out DIR`` runs every step of the GPU run (build
configuration, environment, GPU-marked tests, kernels vs torch with copy bandwidth, Cholesky vs
torch.linalg, lifelong turns against the paper's path with the memory plan) and writes the JSON
and Markdown; a failing or overrunning step is recorded and the run goes on.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_acceptance.sh")
STEPS = ["build", "env", "gpu_tests", "kernels", "cholesky", "turn_embedded", "turn_mistral",
         "turn_llama3"]


def _run(out, *extra, env_extra=None, timeout=150):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env.update(env_extra or {})
    return subprocess.run(["bash", SCRIPT, "--cpu-smoke", "--out", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _finite(x):
    return isinstance(x, (int, float)) and x == x and x not in (float("inf"), float("-inf"))


def _smoke(tmp_path, steps):
    """Run ``steps`` of the smoke run (the suite runs all of them, in two tests that each stay
    under a minute on a shared CI machine) and check the common fields."""
    proc = _run(tmp_path, "--steps", ",".join(steps))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads((tmp_path / "acceptance.json").read_text())
    assert rep["schema"] == "ultraedit-gpu-acceptance/1" and rep["mode"] == "cpu-smoke"
    for key in ("started_utc", "finished_utc", "wall_s", "budget_s", "command"):
        assert rep[key] not in (None, ""), key
    assert rep["wall_s"] <= rep["budget_s"]
    assert set(rep["versions"]) == {"torch", "torch_cuda", "triton", "transformers", "python",
                                    "driver"}
    assert list(rep["steps"]) == steps
    for name, entry in rep["steps"].items():
        assert entry["status"] == "ok", (name, entry)
        assert entry["seconds"] <= entry["budget_s"] + 60
    assert (tmp_path / "acceptance.md").read_text().startswith("# GPU acceptance")
    return rep


def test_cpu_smoke_environment_tests_and_kernels(tmp_path):
    rep = _smoke(tmp_path, STEPS[:5])
    assert rep["card"].startswith("cpu")
    # build: the same configuration as on a GPU, not compiled
    assert rep["build"]["returncode"] == 0 and "build_ext --inplace" in rep["build"]["command"]
    assert rep["build"]["max_jobs"] == os.cpu_count()
    # env: versions and the backend's own report
    info = rep["env"]["ultraedit_kernels_info"]
    assert "extension" in info and "backends" in info
    # GPU-marked tests were collected (and skip without a GPU)
    gt = rep["gpu_tests"]
    assert gt["tests"] > 0 and gt["failures"] == gt["errors"] == 0
    assert "tests/test_triton_gpu.py" in gt["files"]
    # kernels: every op against the torch path, GB/s beside the copy bandwidth
    k = rep["kernels"]
    assert k["copy_gbps"] > 0 and not k["skipped_cases"]
    assert {r["op"] for r in k["rows"]} == {"pseudo_values", "stats_update", "stats_update2", "gram"}
    for r in k["rows"]:
        for f in ("triton_ms", "torch_ms", "speedup_vs_torch", "triton_gbps", "torch_gbps",
                  "triton_frac_of_copy", "torch_frac_of_copy", "bytes_moved"):
            assert _finite(r[f]) and r[f] > 0, (r, f)
        assert r["rel_diff_vs_torch"] < 1e-5, r
    # Cholesky: the native build against torch.linalg, batched, both close to float64
    c = rep["cholesky"]
    assert c["native"] == "cpp" and c["rows"] and any(r["batch"] > 1 for r in c["rows"])
    for r in c["rows"]:
        assert _finite(r["speedup_vs_torch"]) and r["torch_info_max"] == 0
        assert r["cpp_rel_err_vs_fp64"] < 1e-5 and r["torch_rel_err_vs_fp64"] < 1e-5
    md = (tmp_path / "acceptance.md").read_text()
    for heading in ("## Steps", "## Triton kernels vs the torch path", "## Cholesky solve"):
        assert heading in md


def test_cpu_smoke_turns_against_the_paper_path(tmp_path):
    rep = _smoke(tmp_path, STEPS[5:])
    # turns: editor vs paper path, each figure with its ratio, and the memory plan
    assert [t["step"] for t in rep["turns"]] == ["turn_embedded", "turn_mistral", "turn_llama3"]
    for t in rep["turns"]:
        e, p, q = t["editor"], t["paper"], t["ratios"]
        for f in ("turn_s", "fwd_bwd_s", "editor_s", "editor_share", "peak_bytes"):
            assert _finite(e[f]) and e[f] > 0, (t["step"], f)
        for f in ("turn_s", "fwd_bwd_s", "overhead_share", "peak_bytes"):
            assert _finite(p[f]) and p[f] > 0, (t["step"], f)
        assert e["rounds"] == 2 and p["rounds"] == 2
        for f in ("turn_speedup_vs_paper", "fwd_bwd_ratio_vs_paper", "overhead_ratio_vs_paper",
                  "peak_ratio_vs_paper", "plan_vs_measured"):
            assert _finite(q[f]) and q[f] > 0, (t["step"], f)
        assert 0.5 < q["plan_vs_measured"] < 2.0
        assert t["plan"]["items"] and t["modules"] and t["settings"]["lr"] == 1e-6
        a = t["auto"]       # micro_batch="auto" beside the 10-request turn
        assert a["micro_batch"] == t["edits"] and a["rounds"] == 2, (t["step"], a)
        for f in ("turn_s", "fwd_bwd_s", "edits_per_s", "throughput_gain_vs_10",
                  "fwd_bwd_gain_vs_10", "peak_ratio_vs_10", "plan_vs_measured"):
            assert _finite(a[f]) and a[f] > 0, (t["step"], f)
        g = t["grouped"]    # one backward for the turn's micro-batches of 10
        assert g["backward_group"] == -(-t["edits"] // 10) and g["rounds"] == 2, (t["step"], g)
        assert not g["packed"] and t["packed"]["packed"], t["step"]
        for f in ("turn_s", "fwd_bwd_s", "throughput_gain_vs_10", "peak_ratio_vs_10"):
            assert _finite(g[f]) and g[f] > 0, (t["step"], f)
        d = t["defaults"]   # backward_group and pack at "auto": on the CPU, grouped and packed
        assert d["backward_group"] > 1 and d["packed"] and d["rounds"] == 2, (t["step"], d)
        assert "skipped" in t["calibration"]   # the suite runs with ULTRAEDIT_CALIBRATION=off
        ap = t["auto_packed"]   # micro_batch="auto" packed
        assert ap["micro_batch"] == t["edits"] and ap["packed"], (t["step"], ap)
    md = (tmp_path / "acceptance.md").read_text()
    assert "## One lifelong turn" in md and 'micro_batch="auto" beside' in md
    assert "One backward for the turn's micro-batches" in md
    assert "### The defaults beside the 10-request turn" in md
    assert 'micro_batch="auto" packed beside' in md


def test_failed_and_overrunning_steps_are_recorded(tmp_path):
    proc = _run(tmp_path, "--steps", "kernels,cholesky,turn_mistral", "--budget-s", "14",
                env_extra={"ULTRAEDIT_ACCEPTANCE_FAIL": "kernels",
                           "ULTRAEDIT_ACCEPTANCE_HANG": "cholesky"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rep = json.loads((tmp_path / "acceptance.json").read_text())
    steps = rep["steps"]
    assert steps["kernels"]["status"] == "failed"
    assert "failure injected" in steps["kernels"]["error"]
    assert steps["cholesky"]["status"] == "timeout"
    assert steps["cholesky"]["partial"] == {"injected": "hang"}
    assert steps["turn_mistral"]["status"] == "skipped"
    assert "left of the run's 14 s budget" in steps["turn_mistral"]["reason"]
    md = (tmp_path / "acceptance.md").read_text()
    assert "| kernels | failed |" in md and "| cholesky | timeout |" in md

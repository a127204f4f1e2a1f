"""Every Triton kernel configuration compiles ahead of time for sm_80 and sm_90, no GPU needed.

The compile runs once per session in a subprocess without ``TRITON_INTERPRET`` (under the
interpreter ``triton.jit`` returns functions that cannot be compiled), with a fresh Triton cache
so that every configuration is really lowered to PTX and assembled by ptxas.  Each
(configuration, target) is one test; its shared-memory use is recorded as a property
(``--junitxml`` shows it) and checked against the target's limit.

By hand: ``python -m ultraedit_kernels._triton.aot``.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
TARGETS = ("cuda:80:32", "cuda:90:32")

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _spec_names():
    if not HAS_TRITON:
        return []
    from ultraedit_kernels._triton.aot import all_specs
    return [spec.name for spec in all_specs()]


SPEC_NAMES = _spec_names()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "ultraedit_kernels._triton.aot", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), f"AOT driver printed nothing (rc={proc.returncode}):\n{proc.stderr}"
    return {(row["name"], row["target"]): row for row in json.loads(proc.stdout)}


def test_every_launch_configuration_is_listed():
    from ultraedit_kernels._triton import gram, pseudo_values, stats_update
    n_dtypes = 3
    assert sum(n.startswith("pseudo_values[") for n in SPEC_NAMES) == n_dtypes * len(pseudo_values.CONFIGS)
    assert sum(n.startswith("gram[") for n in SPEC_NAMES) == n_dtypes * len(gram.CONFIGS) * 2
    assert sum(n.startswith("stats_partial[") for n in SPEC_NAMES) == n_dtypes
    assert sum(n.startswith("stats_finalize[") for n in SPEC_NAMES) == 2
    assert stats_update.PARTIAL_CONFIG and len(set(SPEC_NAMES)) == len(SPEC_NAMES)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_compiles(compiled, record_property, name, target):
    row = compiled.get((name, target))
    assert row is not None, f"{name} was not compiled for {target}"
    assert row["ok"], f"{name} for {target}: {row.get('error')}"
    record_property("shared_bytes", row["shared"])
    record_property("num_warps", row["num_warps"])
    record_property("num_stages", row["num_stages"])
    assert row["cubin_bytes"] > 0
    assert 0 <= row["shared"] <= 163 * 1024   # fits the smaller (sm_80) opt-in limit

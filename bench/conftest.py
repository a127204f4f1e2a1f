"""Benchmark fixtures and collection rules (the test command, ``pytest tests``, never runs these).

Run the suites with::

    PYTHONPATH=.:python python -m pytest bench --benchmark-json=bench/out/results.json
    PYTHONPATH=.:python python -m pytest bench --quick ...      # skip cases marked `heavy`

Files are named ``bench_*.py`` and are collected only when ``bench`` (or a file in it) is named
on the command line; a bare ``pytest`` at the root (``testpaths = ["tests"]``) never reaches them,
and ``pytest tests`` does not load this directory at all.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_BENCH_DIR = Path(__file__).resolve().parent
_ROOT = _BENCH_DIR.parent
for _p in (str(_BENCH_DIR), str(_ROOT), str(_ROOT / "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_addoption(parser):
    group = parser.getgroup("ultraedit-bench")
    group.addoption("--quick", action="store_true", default=False,
                    help="skip the benchmark cases marked `heavy` (7B shapes at N=2000, the "
                         "paper baseline of 14336 -> 4096 modules, the embedded-model turn)")


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: slow benchmark case (deselected by --quick)")
    threads = os.environ.get("ULTRAEDIT_BENCH_THREADS")
    if threads:   # e.g. 1 on a machine shared with other jobs (less OpenMP barrier stalls)
        import torch
        torch.set_num_threads(int(threads))


def _bench_requested(config) -> bool:
    for arg in config.args:
        path = Path(str(arg).split("::", 1)[0]).resolve()
        if path == _BENCH_DIR or _BENCH_DIR in path.parents:
            return True
    return False


def pytest_collect_file(file_path, parent):
    if parent.session.isinitpath(file_path):
        return None  # a file named on the command line is collected by pytest itself
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and _BENCH_DIR in file_path.parents and _bench_requested(parent.config)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--quick"):
        return
    skip = pytest.mark.skip(reason="heavy case skipped by --quick")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    from _common import machine_description
    machine_info["ultraedit"] = machine_description()


@pytest.fixture(scope="session")
def device():
    from _common import bench_device
    return bench_device()


@pytest.fixture(scope="session")
def session_results():
    """Numbers shared between cases of one run (e.g. a baseline timed before its comparison)."""
    return {}

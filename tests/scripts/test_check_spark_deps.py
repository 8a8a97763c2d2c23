"""scripts/check_spark_deps.py: trimode's runtime dependency set resolves to wheels a DGX Spark (aarch64, glibc
2.35, CPython 3.12) can install, asked of the package registry with pip's exact platform tags; skipped with the
reason when the registry does not answer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_spark_deps.py"


def load():
    spec = importlib.util.spec_from_file_location("check_spark_deps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requirements_and_tags_are_the_sparks():
    script = load()
    reqs = script.requirements()
    names = [r.split("=")[0].split(">")[0].split("<")[0].split("[")[0] for r in reqs]
    assert "torch==2.13.0" in reqs and "tensorrt-rtx-cu13-libs==1.7.1.116" in reqs
    assert "tensorrt-rtx-cu12-libs" not in names  # the x86_64 wheels' marker is false on the Spark
    assert not any(";" in r for r in reqs) and "trimode" not in names
    args = script.platform_args()
    platforms = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    assert platforms[0] == "manylinux_2_17_aarch64" and "manylinux_2_35_aarch64" in platforms
    assert "manylinux_2_36_aarch64" not in platforms and "manylinux2014_aarch64" in platforms
    assert args[args.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in args


def test_an_unreachable_registry_is_told_apart(monkeypatch):
    """A registry that does not answer (here: a closed port) is 'unreachable' (exit 75, the test skips), not
    'does not resolve'."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    answers, why = load().registry_answers()
    assert not answers and "127.0.0.1" in why and "Could not fetch URL" in why, why


@pytest.mark.slow
def test_runtime_dependencies_resolve_for_the_spark(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--report", str(tmp_path / "r.json")], capture_output=True,
                       text=True, timeout=1200)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if r.returncode == 75:
        pytest.skip(f"the package registry did not answer: {result['error']}")
    assert r.returncode == 0 and result["resolved"], result["error"]
    got = {name.lower().replace("_", "-"): version for name, version in result["packages"].items()}
    assert got["torch"] == "2.13.0" and got["tensorrt-rtx-cu13-libs"] == "1.7.1.116"
    assert got["tensorrt-rtx-cu13-bindings"] == "1.7.1.116" and "tensorrt-rtx-cu12-libs" not in got
    for name in ("triton", "onnxruntime", "nvidia-modelopt", "mpi4py", "mpich", "tritonclient", "onnx"):
        assert name in got, name

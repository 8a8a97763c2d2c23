"""Check that trimode's runtime dependency set resolves to wheels installable on a DGX Spark (aarch64, glibc 2.35,
CPython 3.12), from any machine: ``pip install --dry-run`` for that platform, binary wheels only.

    python scripts/check_spark_deps.py                  # exit 0: resolves; 1: does not; 75: registry unreachable
    python scripts/check_spark_deps.py --report out.json

The set is the project's own dependencies plus its ``build``, ``tp`` and ``tensorrt-rtx`` extras and the Triton
client (pyproject.toml), with environment markers evaluated for the Spark (so ``tensorrt-rtx`` selects the CUDA 13
aarch64 wheels), and ``torch`` pinned to the version setup_env.sh installs. pip's ``--platform`` matches wheel
tags exactly, so every tag a glibc 2.35 aarch64 machine accepts is passed: ``manylinux_2_17`` ...
``manylinux_2_35``, ``manylinux2014`` and ``linux`` (aarch64), with ``--python-version 3.12``, ABIs ``cp312``,
``abi3``, ``none`` and ``--only-binary=:all:``. pip downloads the wheels it must read metadata from (into a
scratch directory, removed afterwards); nothing is installed.

The last stdout line is JSON: ``{"resolved": bool, "packages": {name: version}, "error": str | null}``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # as scripts/setup_env.sh installs (CPU there; the aarch64 wheel is the CUDA 13 build)
EXTRAS = ("build", "tp", "tensorrt-rtx")
EXTRA_REQUIREMENTS = ("tritonclient[http,grpc]>=2.50",)  # the serving client (dev extra)
SPARK_ENV = {"platform_machine": "aarch64", "sys_platform": "linux", "platform_system": "Linux",
             "os_name": "posix", "python_version": "3.12", "python_full_version": "3.12.3",
             "implementation_name": "cpython", "platform_python_implementation": "CPython"}
GLIBC_MINORS = range(17, 36)  # manylinux_2_17 .. manylinux_2_35
UNREACHABLE = re.compile(r"NewConnectionError|Max retries exceeded|Name or service not known|Temporary failure in "
                         r"name resolution|Could not fetch URL|Read timed out|ConnectTimeout|Network is unreachable|"
                         r"Connection refused|No route to host")
EX_TEMPFAIL = 75


def platform_args() -> list[str]:
    """pip options selecting the Spark's wheels: every compatible platform tag, CPython 3.12, binaries only."""
    tags = [f"manylinux_2_{m}_aarch64" for m in GLIBC_MINORS] + ["manylinux2014_aarch64", "linux_aarch64"]
    out = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    for abi in ("cp312", "abi3", "none"):
        out += ["--abi", abi]
    for tag in tags:
        out += ["--platform", tag]
    return out


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The runtime requirement strings for the Spark: dependencies + EXTRAS, markers evaluated for SPARK_ENV
    (requirements whose marker is false there are dropped, the others lose their marker), torch pinned."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads(pyproject.read_text())["project"]
    raw = list(project["dependencies"])
    for extra in EXTRAS:
        raw += project["optional-dependencies"][extra]
    out = []
    for text in [*raw, *EXTRA_REQUIREMENTS]:
        req = Requirement(text)
        if req.name == "trimode":
            continue
        if req.marker is not None and not req.marker.evaluate(dict(SPARK_ENV, extra="")):
            continue
        req.marker = None
        out.append(TORCH if req.name == "torch" else str(req))
    return out


def registry_answers(probe: str = "tensorrt-rtx-cu13-libs", timeout: float = 120) -> tuple[bool, str]:
    """(True, "") if the package index lists ``probe``; (False, why) if pip could not reach it."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", "-vv", "--disable-pip-version-check", probe]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"pip index versions {probe} did not answer within {timeout:.0f} s"
    if r.returncode == 0:
        return True, ""
    text = r.stdout + r.stderr
    lines = [line for line in text.splitlines() if UNREACHABLE.search(line)]
    return False, (lines[0][:300] if lines else " ".join(text.strip().splitlines()[-1:]))


def check(reqs: list[str], timeout: float = 900) -> dict:
    """Run the dry-run resolution; {"resolved", "packages", "error", "unreachable"}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-cache-dir",
               "--disable-pip-version-check", "--target", str(Path(tmp) / "target"), "--report", str(report),
               *platform_args(), *reqs]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"resolved": False, "packages": {}, "unreachable": True,
                    "error": f"pip did not finish within {timeout:.0f} s"}
        if r.returncode == 0 and report.is_file():
            installs = json.loads(report.read_text())["install"]
            return {"resolved": True, "unreachable": False, "error": None,
                    "packages": {i["metadata"]["name"]: i["metadata"]["version"] for i in installs}}
    text = r.stdout + r.stderr
    errors = [line for line in text.splitlines() if line.startswith("ERROR")]
    return {"resolved": False, "packages": {}, "unreachable": bool(UNREACHABLE.search(text)),
            "error": " | ".join(errors[-3:]) or " ".join(text.strip().splitlines()[-1:])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--report", type=Path, help="also write the JSON result here")
    a = p.parse_args(argv)
    reqs = requirements()
    print("resolving for aarch64 / glibc 2.35 / cp312: " + " ".join(reqs), file=sys.stderr)
    answers, why = registry_answers()
    if answers:
        result = check(reqs)
    else:
        result = {"resolved": False, "packages": {}, "unreachable": True, "error": why}
    result["requirements"] = reqs
    if a.report:
        a.report.write_text(json.dumps(result, indent=1) + "\n")
    if result["resolved"]:
        names = ("torch", "triton", "onnxruntime", "nvidia-modelopt", "tensorrt_rtx_cu13_libs",
                 "tensorrt-rtx-cu13-libs", "mpi4py", "mpich", "tritonclient")
        found = {k: v for k, v in result["packages"].items() if k in names}
        print(f"resolves: {len(result['packages'])} wheels, e.g. {found}", file=sys.stderr)
    else:
        print(f"does not resolve{' (registry unreachable)' if result['unreachable'] else ''}: {result['error']}",
              file=sys.stderr)
    print(json.dumps(result))
    if result["resolved"]:
        return 0
    return EX_TEMPFAIL if result["unreachable"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where a build writes: an --out that overlaps --model (equal, inside it, holding it, through a symbolic link)
is a one-line error before anything is written; a build that fails at any stage (an error, a failed
quantization, SIGTERM) leaves no files behind, not even the parent folders it created; a failed --overwrite
keeps the old build."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from build_helpers import BUILD_SCRIPT, child_env
from trimode.build.pipeline import BuildOptions, build
from trimode.runtime.executors.engine_dir import check_engine_dir, read_manifest


def build_script():
    spec = importlib.util.spec_from_file_location("build_engine_script", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size (directories: -1), to compare before and after."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


@pytest.fixture()
def model(checkpoints, tmp_path) -> Path:
    return Path(shutil.copytree(checkpoints["mha-default-rope"], tmp_path / "M"))


@pytest.mark.parametrize("out,message", [
    ("M/engine", "is inside --model"),        # the reported case
    ("M/a/b/engine", "is inside --model"),
    ("M", "is the --model directory"),
    (".", "is inside --out"),                 # the model inside the engine directory
    ("link/engine", "is inside --model"),     # through a symbolic link to the model
])
def test_out_overlapping_model_is_refused_before_anything_is_written(model, tmp_path, capsys, out, message):
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    before = tree(tmp_path)
    argv = ["--model", str(model), "--out", str(tmp_path / out), "--page-size", "4", "--max-seq", "64"]
    assert build_script().main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert tree(tmp_path) == before


class Stop(Exception):
    pass


def failing_at(prefix: str):
    def log(message: str) -> None:
        if message.startswith(prefix):
            raise Stop(message)
    return log


@pytest.mark.parametrize("stage", ["[2/5]", "onnx [2/", "[5/5]"])  # before the copy, mid-export, before the manifest
def test_failed_build_leaves_nothing_behind(model, tmp_path, stage):
    before = tree(tmp_path)
    opts = BuildOptions(model=model, out=tmp_path / "new" / "deeper" / "eng", modes=("ar",), block_length=4,
                        max_batch=2, max_seq=64, page_size=4, progress=False)
    with pytest.raises(Stop):
        build(opts, log=failing_at(stage))
    assert tree(tmp_path) == before


def test_failed_overwrite_keeps_the_old_build(model, tmp_path):
    opts = dict(model=model, out=tmp_path / "eng", modes=("ar",), block_length=4, max_batch=2, max_seq=64,
                page_size=4, progress=False)
    build(BuildOptions(**opts), log=lambda _: None)
    manifest, before = read_manifest(tmp_path / "eng"), tree(tmp_path)
    with pytest.raises(Stop):
        build(BuildOptions(**{**opts, "block_length": 8}, overwrite=True), log=failing_at("[5/5]"))
    assert tree(tmp_path) == before and read_manifest(tmp_path / "eng") == manifest
    check_engine_dir(tmp_path / "eng", verify_hashes="all")


@pytest.mark.slow
def test_failed_quantization_leaves_nothing_behind(model, tmp_path):
    """The ModelOpt child fails (calibration text shorter than one sample): one error line, no files."""
    before = tree(tmp_path)
    proc = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--model", str(model), "--out",
                           str(tmp_path / "new" / "eng"), "--quant", "fp8", "--calib-text", "w5 w6 w7",
                           "--calib-seq-len", "16", "--page-size", "4", "--no-progress"],
                          capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: quantization (fp8) failed: calibration text")
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_sigterm_removes_the_partial_build(model, tmp_path):
    """SIGTERM to the build process alone (as a service manager or `timeout` sends it) while its ModelOpt child
    quantizes (seconds: no race with the end of the build): the build unwinds, stops the child, and removes
    everything it wrote."""
    before = tree(tmp_path)
    proc = subprocess.Popen([sys.executable, str(BUILD_SCRIPT), "--model", str(model), "--out",
                             str(tmp_path / "new" / "eng"), "--quant", "fp8", "--calib-text", "w5 w6 w7 " * 50,
                             "--calib-samples", "2", "--calib-seq-len", "16", "--page-size", "4", "--no-progress"],
                            stderr=subprocess.PIPE, text=True, env=child_env())
    for line in proc.stderr:
        if line.startswith("[2/5]"):
            break
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert tree(tmp_path) == before

"""Calibration sources of quantized builds: with nothing given, the shipped model builds offline on the
King James Bible text that ships inside the package, and says so; the checkpoint's own text comes first; a
Hugging Face dataset name needs `datasets` (a one-line error before anything is written without it); more than
one source is refused."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from build_helpers import BUILD_SCRIPT, ROOT, SHIPPED, child_env
from trimode.build.calibration import (SHIPPED_SOURCE, SHIPPED_TEXT, CalibrationError, calibration_set,
                                       dataset_text, resolve_calibration_text, shipped_text)
from trimode.runtime.executors.engine_dir import check_engine_dir, read_manifest
from trimode.runtime.model.checkpoint import load_tokenizer


@pytest.mark.slow
def test_fp8_build_of_the_shipped_model_needs_no_calibration_option(tmp_path):
    """The reported command (--model models/tiny-kjv --quant fp8), kept small: it builds, prints its source and
    records it in the manifest."""
    out = tmp_path / "eng"
    proc = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--model", str(SHIPPED), "--quant", "fp8", "--out",
                           str(out), "--modes", "ar", "--calib-samples", "4", "--calib-seq-len", "64",
                           "--max-seq", "256", "--no-progress"],
                          capture_output=True, text=True, env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"calibration: 4 samples x 64 tokens from {SHIPPED_SOURCE}" in proc.stderr
    calibration = read_manifest(out)["recipe"]["modelopt"]["calibration"]
    assert calibration["source"] == SHIPPED_SOURCE and calibration["num_samples"] == 4
    check_engine_dir(out)


def test_shipped_text_is_packaged_and_long_enough():
    """In the package data (so it installs), and with the default 32 x 256 windows it does not repeat itself on
    the shipped tokenizer."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    package_data = pyproject.split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    assert '"trimode.build" = ["data/*.txt"' in package_data
    assert (ROOT / "build" / "data" / SHIPPED_TEXT).is_file()
    tok = load_tokenizer(SHIPPED)
    calib = calibration_set(tok, shipped_text(), SHIPPED_SOURCE, 32, 256)
    assert calib.num_text_tokens >= 32 * 256
    starts = {tuple(s[:8].tolist()) for s in calib.samples}
    assert len(starts) == 32


def test_sources_in_order(tmp_path):
    ckpt = Path(shutil.copytree(SHIPPED, tmp_path / "ckpt", ignore=shutil.ignore_patterns("*.safetensors")))
    assert resolve_calibration_text(ckpt) == (shipped_text(), SHIPPED_SOURCE)
    (ckpt / "heldout.txt").write_text("held out")
    assert resolve_calibration_text(ckpt) == ("held out", "heldout.txt")
    (ckpt / "calibration.txt").write_text("own text")
    assert resolve_calibration_text(ckpt) == ("own text", "calibration.txt")
    (tmp_path / "f.txt").write_text("file text")
    assert resolve_calibration_text(ckpt, calib_file=tmp_path / "f.txt") == ("file text", "f.txt")
    assert resolve_calibration_text(ckpt, calib_text="inline") == ("inline", "text")


@pytest.mark.parametrize("argv,message", [
    (["--calib-text", "a b", "--calib-file", "f.txt"], "--calib-text and --calib-file both name calibration text"),
    (["--calib-file", "missing.txt"], "calibration file missing.txt does not exist"),
    pytest.param(["--calib-dataset", "Salesforce/wikitext:wikitext-2-raw-v1"],
                 "needs the Hugging Face `datasets` package, which is not installed: pip install datasets",
                 marks=pytest.mark.skipif(importlib.util.find_spec("datasets") is not None,
                                          reason="`datasets` is installed")),
])
def test_calibration_errors_come_before_anything_is_written(checkpoints, tmp_path, capsys, monkeypatch, argv,
                                                            message):
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("build_engine_script", BUILD_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    before = sorted(tmp_path.rglob("*"))
    code = script.main(["--model", checkpoints["mha-default-rope"], "--out", str(tmp_path / "new" / "eng"),
                        "--quant", "fp8", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_dataset_text_streams_only_what_it_needs(monkeypatch):
    """``dataset_text`` against a stand-in ``datasets`` module (the real one and the Hub are not reachable here):
    NAME:CONFIG is split, the split is streamed, the ``text`` column (else the first string column) is read
    until the character budget is met, blank rows are skipped."""
    calls, consumed = [], []

    def rows(columns):
        for i in range(1000):
            consumed.append(i)
            yield {"id": i, **{c: ("" if i % 3 == 0 else f"row {i} " * 4) for c in columns}}

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return rows(["content"] if path == "other" else ["title", "text"])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    text = dataset_text("Salesforce/wikitext:wikitext-2-raw-v1", 200)
    assert calls[-1] == ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", True)
    assert 200 <= len(text) < 300 and text.startswith("row 1 row 1") and "\n\n" not in text
    assert len(consumed) < 20
    assert dataset_text("other", 50).startswith("row 1 ") and calls[-1][1] is None

    def broken(*args, **kwargs):
        raise ConnectionError("could not reach the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=broken))
    with pytest.raises(CalibrationError, match="dataset 'x' could not be loaded: ConnectionError: could not reach"):
        dataset_text("x", 10)

"""``trimode triton-repo`` / ``trimode serve`` over an engine directory (scripts/build_engine.py, ONNX stage only):
a real ``tritonserver`` started by ``trimode serve --engine DIR`` (``--executor onnxruntime``, and ``auto``, which
falls back to onnxruntime on a machine whose engine has no TensorRT plans) answers greedy requests over gRPC with
``TriModeLM.from_engine(DIR, executor="onnxruntime")``'s tokens in ar and spec mode, reports its executor in
``stats``, and runs with TensorRT-RTX's library link directory on its backend's loader path. A bad ``--engine`` is
a one-line error with exit status 2; ``--engine`` with ``--model`` is refused by argparse, ``--executor tensorrt``
without plans before a server starts.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from build_helpers import finish, start_build
from test_triton_server import _ensure_backend_env, mode_config, prompt_words


@pytest.fixture(scope="module")
def engine(checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve-engine") / "eng"
    finish(start_build(Path(checkpoints["gqa2-yarn-lora"]), out, "none"))  # onnx stage only: no --target
    return out


@pytest.fixture(scope="module")
def reference(engine):
    from trimode.runtime.api import TriModeLM

    return TriModeLM.from_engine(engine, executor="onnxruntime", threads=1)


@pytest.fixture(scope="module", params=["onnxruntime", "auto"])
def served(request, engine, tmp_path_factory):
    """``trimode serve --engine DIR --executor <param>`` as a child process: (executor, ready line, log path)."""
    _ensure_backend_env()
    tmp = tmp_path_factory.mktemp(f"serve-{request.param}")
    log, err = tmp / "tritonserver.log", tmp / "serve.err"
    cmd = [sys.executable, "-m", "trimode.runtime.cli", "serve", "--engine", str(engine), "--executor",
           request.param, "--threads", "1", "--default-mode", "ar", "--log-file", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(err, "w"), text=True)
    try:
        line = proc.stdout.readline()
        assert line, err.read_text()[-3000:]
        ready = json.loads(line)
        assert ready["ready"], ready
        yield request.param, ready, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    stopped = json.loads(proc.stdout.read().strip().splitlines()[-1])["stopped"]
    assert code == 0 and stopped["clean"], (stopped, err.read_text()[-3000:])
    assert "Traceback" not in log.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize("mode,max_tokens,plen", [("ar", 20, 3), ("spec", 21, 9)])
def test_greedy_outputs_equal_from_engine(served, reference, mode, max_tokens, plen):
    from trimode.runtime.serving.client import StreamingClient

    _, ready, _ = served
    prompt = prompt_words(plen, offset=plen)
    ref = reference.run([reference.request(prompt, max_tokens,
                                           mode_config(mode, reference.default_block_length))])[0]
    assert len(ref.token_ids) > 1
    with StreamingClient(ready["grpc"]) as c:
        r = c.generate(text_input=prompt, max_tokens=max_tokens, mode=mode)
    assert r.error is None, r.error
    assert r.token_ids == ref.token_ids
    assert r.text == reference.tokenizer.decode(ref.token_ids)
    assert (r.counters["forwards"].get("draft", 0) > 0) == (mode == "spec"), r.counters


@pytest.mark.slow
def test_executor_in_stats_and_log_and_the_loader_path(served, engine):
    from trimode.plugins import tensorrt_libs
    from trimode.runtime.cli.serve import tensorrt_library_dirs
    from trimode.runtime.serving.server import stats

    executor, ready, log = served
    s = stats(ready["grpc"])
    assert s["executor"] == "onnxruntime", s  # auto: the engine has no TensorRT plans
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "trimode: engine directory" in ln]
    assert len(lines) == 1 and f"{engine}: executor onnxruntime" in lines[0], lines
    assert ("has no TensorRT engines" in lines[0]) == (executor == "auto"), lines[0]
    # the backend process (started by tritonserver) has TensorRT-RTX's link directory on its loader path
    dirs = tensorrt_library_dirs()
    if tensorrt_libs.rtx_library_dir() is None:
        assert dirs == []
        return
    environ = dict(e.split(b"=", 1) for e in Path(f"/proc/{s['pid']}/environ").read_bytes().split(b"\0") if b"=" in e)
    path = environ[b"LD_LIBRARY_PATH"].decode().split(":")
    assert dirs[0] in path and (Path(dirs[0]) / tensorrt_libs.RTX_LIBRARY).exists(), (dirs, path)


def test_engine_repository(engine, tmp_path):
    from trimode.runtime.cli.main import main
    from trimode.runtime.executors.engine_dir import EngineMismatch
    from trimode.runtime.serving.repository import write_repository
    from trimode.runtime.serving.triton_request import parse_parameters

    assert main(["triton-repo", "--engine", str(engine), "--out", str(tmp_path / "r"), "--copy-model",
                 "--max-concurrent-requests", "2"]) == 0
    config = (tmp_path / "r" / "trimode" / "config.pbtxt").read_text()
    params = dict(re.findall(r'key: "(\w+)"\n  value: \{ string_value: "(.*)" \}', config))
    parsed = parse_parameters(params)
    assert parsed["engine_dir"] == "engine" and parsed["model_dir"] == "" and parsed["executor"] == "auto"
    assert (parsed["num_pages"], parsed["page_size"], parsed["max_concurrent_requests"]) == (0, 0, 2)
    assert (tmp_path / "r" / "trimode" / "1" / "engine" / "manifest.json").exists()
    with pytest.raises(EngineMismatch, match="max_pages_total"):  # more pages than the engine was built for
        write_repository(tmp_path / "r2", engine_dir=engine, num_pages=10**6)
    with pytest.raises(ValueError, match="executor 'tensorrt' runs an engine directory"):
        write_repository(tmp_path / "r3", engine / "checkpoint", executor="tensorrt")


def test_bad_engine_is_one_line_and_engine_with_model_is_refused(engine, tmp_path, capsys):
    from trimode.runtime.cli.main import main

    for bad, words in ((tmp_path / "missing", "is not a directory"), (engine / "checkpoint", "no manifest.json")):
        p = subprocess.run([sys.executable, "-m", "trimode.runtime.cli", "serve", "--engine", str(bad)],
                           capture_output=True, text=True, timeout=120, check=False)
        assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stdout, p.stderr)
        assert p.stderr.startswith("trimode: error: --engine: ") and words in p.stderr, p.stderr
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    with pytest.raises(SystemExit) as e:
        main(["serve", "--engine", str(engine), "--model", str(engine / "checkpoint")])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # forced TensorRT without plans: refused before any server starts
        main(["serve", "--engine", str(engine), "--executor", "tensorrt"])
    assert e.value.code == 2
    assert "--executor tensorrt cannot run" in capsys.readouterr().err

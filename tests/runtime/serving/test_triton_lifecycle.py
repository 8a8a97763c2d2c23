"""The Triton deployment at the edges of its life, against a real ``tritonserver``: stopping with streams in
flight (SIGTERM / SIGINT to ``trimode serve``, SIGTERM to tritonserver itself), a launcher killed with SIGKILL
(no orphans; a restart on the same ports is ready with its own server), a huge prompt beside a running stream,
a burst against a small queue limit, and one validation for every front door (every refusal counted).

Servers here are ``trimode serve`` processes (signals need a launcher of their own) and one module-scoped
in-process server for the request-level checks.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

from test_triton_server import _ensure_backend_env, mode_config, prompt_words

pytestmark = pytest.mark.slow

NUM_PAGES, PAGE_SIZE, BATCH, QUEUE = 64, 4, 4, 1
STREAM_PAGES = 1100  # four streams of 1000 tokens at once


def _members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (tritonserver and its backend stubs)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid and open(f"/proc/{d}/stat").read().split()[2] != "Z":
                    out.append(int(d))
            except (OSError, IndexError):
                pass
    return out


def _wait_gone(pgid: int, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while _members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _members(pgid)


def _leftovers(serve_pid: int) -> list[str]:
    tmp = tempfile.gettempdir()
    return (glob.glob(f"/dev/shm/trimode_{serve_pid}_*") + glob.glob(os.path.join(tmp, f"trimode-triton-{serve_pid}-*"))
            + glob.glob(os.path.join(tmp, f"trimode-repo-{serve_pid}-*")))


class Launcher:
    """``trimode serve --model CKPT`` as a child process; ``ready`` is its first JSON line."""

    def __init__(self, ckpt: str, tmp_path, *extra: str, num_pages: int = NUM_PAGES) -> None:
        self.log_path = tmp_path / f"tritonserver-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "trimode.runtime.cli", "serve", "--model", ckpt, "--num-pages", str(num_pages),
               "--page-size", str(PAGE_SIZE), "--default-mode", "ar", "--threads", "1", "--max-tokens-limit",
               "1000", "--log-file", str(self.log_path), *extra]
        self.err_path = tmp_path / f"serve-{time.monotonic_ns()}.err"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.err_path, "w"), text=True)
        line = self.proc.stdout.readline()
        assert line, self.err_path.read_text()[-3000:]
        self.ready = json.loads(line)
        assert self.ready["ready"]

    def finish(self, timeout: float = 60.0) -> tuple[int, dict | None]:
        code = self.proc.wait(timeout)
        rest = self.proc.stdout.read().strip().splitlines()
        stopped = json.loads(rest[-1])["stopped"] if rest else None
        return code, stopped

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _wait_gone(self.ready["pid"], 10)


def _streams(grpc_url: str, n: int, max_tokens: int = 1000) -> tuple[list, list[threading.Event], list]:
    """``n`` long diffusion streams on ``grpc_url`` (prompts that the random checkpoint does not end early);
    returns (results, first-token events, threads)."""
    from trimode.runtime.serving.client import StreamingClient

    results: list = [None] * n
    started = [threading.Event() for _ in range(n)]

    def run(i: int) -> None:
        with StreamingClient(grpc_url) as c:
            results[i] = c.generate(text_input=prompt_words(3, offset=2 + i % 4), max_tokens=max_tokens,
                                    mode="diffusion", block_length=8, timeout=120,
                                    on_chunk=lambda ids: started[i].set())
            started[i].set()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return results, started, threads


# ---- stopping --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_launcher_ends_every_stream_and_leaves_nothing(ckpt, tmp_path, sig):
    from trimode.runtime.serving.client import StreamingClient

    _ensure_backend_env()
    serve = Launcher(ckpt, tmp_path, num_pages=STREAM_PAGES)
    try:
        n = 4 if sig == signal.SIGTERM else 1
        results, started, threads = _streams(serve.ready["grpc"], n)
        idle = StreamingClient(serve.ready["grpc"])  # an idle open stream must not hold the stop up
        for e in started:
            assert e.wait(60)
        t0 = time.monotonic()
        os.kill(serve.ready["serve_pid"], sig)
        for t in threads:
            t.join(60)
        ended = time.monotonic() - t0
        code, stopped = serve.finish()
        idle.close()
    finally:
        serve.kill()
    for r in results:  # every stream got a final answer: the shutdown error (or its end, had it finished)
        assert r is not None and (r.error is not None or r.finish_reason), r
        if r.error is not None:
            assert "shutting down" in r.error, r.error
    assert any(r.error for r in results)
    assert ended < 30, ended  # generous: a bound, not a timing
    assert code == 0, (stopped, serve.err_path.read_text()[-3000:])
    assert stopped["clean"] and stopped["drained"] and stopped["unloaded"] and not stopped["crashed"], stopped
    assert "Signal (11)" not in serve.log_path.read_text(errors="replace")
    assert _wait_gone(serve.ready["pid"]) == []
    assert _leftovers(serve.ready["serve_pid"]) == []


def test_sigterm_to_tritonserver_ends_the_streams_and_is_seen_by_the_health_check(ckpt, tmp_path):
    """The model sees its server unload it with streams in flight and ends them at once (tritonserver would wait
    for them, then exit under them); the launcher sees the server not ready, stops it and exits 1."""
    from trimode.runtime.serving.client import StreamingClient

    _ensure_backend_env()
    serve = Launcher(ckpt, tmp_path, "--health-interval", "0.5", "--health-timeout", "2", num_pages=STREAM_PAGES)
    try:
        results, started, threads = _streams(serve.ready["grpc"], 2)
        idle = StreamingClient(serve.ready["grpc"])  # keeps tritonserver from ever exiting on its own
        for e in started:
            assert e.wait(60)
        os.kill(serve.ready["pid"], signal.SIGTERM)
        for t in threads:
            t.join(60)
        code, stopped = serve.finish(timeout=60)
        idle.close()
    finally:
        serve.kill()
    for r in results:
        assert r is not None and (r.finish_reason or "shutting down" in (r.error or "")), (r.error, r.finish_reason)
    log = serve.log_path.read_text(errors="replace")[-3000:]
    assert code == 1, (stopped, log)  # the server went away behind the launcher's back: not a clean stop
    # seen as not ready, or (no client stream held it up yet) already exited by itself
    assert not stopped["clean"] and ("not been ready" in stopped["failure"] or "exited" in stopped["failure"]), \
        (stopped, log)
    assert not stopped["crashed"], (stopped, log)
    assert _wait_gone(serve.ready["pid"]) == []
    assert _leftovers(serve.ready["serve_pid"]) == []


def test_a_hung_tritonserver_is_seen_by_the_health_check_and_killed(ckpt, tmp_path):
    _ensure_backend_env()
    serve = Launcher(ckpt, tmp_path, "--health-interval", "0.5", "--health-timeout", "2", "--exit-timeout", "1",
                     "--kill-grace", "1")
    try:
        os.kill(serve.ready["pid"], signal.SIGSTOP)  # alive, but answers nothing
        t0 = time.monotonic()
        code, stopped = serve.finish(timeout=60)
        took = time.monotonic() - t0
    finally:
        serve.kill()
    assert code == 1 and stopped["killed"] and not stopped["clean"], stopped
    assert "not been ready" in stopped["failure"], stopped
    assert took < 30, took  # a bound, not a timing
    assert _wait_gone(serve.ready["pid"]) == []  # the backend stub went with it
    assert _leftovers(serve.ready["serve_pid"]) == []


# ---- no orphans; ready means ours -------------------------------------------------------------------------

def test_sigkill_of_the_launcher_leaves_no_orphans_and_a_restart_on_the_same_ports_is_its_own(ckpt, tmp_path):
    from trimode.runtime.serving.client import StreamingClient
    from trimode.runtime.serving.server import free_port

    _ensure_backend_env()
    ports = [str(free_port()) for _ in range(3)]
    args = ("--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2])
    first = Launcher(ckpt, tmp_path, *args)
    try:
        members = _members(first.ready["pid"])
        assert len(members) >= 2  # tritonserver and its backend stub
        os.kill(first.ready["serve_pid"], signal.SIGKILL)
        first.proc.wait(10)
        assert _wait_gone(first.ready["pid"]) == []  # no orphan keeps serving
    finally:
        first.kill()
    second = Launcher(ckpt, tmp_path, *args)  # removes what the killed launcher left behind
    try:
        assert _leftovers(first.ready["serve_pid"]) == []
        with StreamingClient(second.ready["grpc"]) as c:
            st = c.stats()
            assert st["server_pid"] == second.ready["pid"] != first.ready["pid"]
            r = c.generate(text_input="w5 w6 w7", max_tokens=4, mode="ar")
            assert r.error is None and len(r.token_ids) >= 1
        os.kill(second.ready["serve_pid"], signal.SIGTERM)
        code, stopped = second.finish()
        assert code == 0, stopped
    finally:
        second.kill()


# ---- one in-process server for the request-level checks ---------------------------------------------------

@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    _ensure_backend_env()
    from trimode.runtime.serving.repository import write_repository
    from trimode.runtime.serving.server import TritonServer

    repo = write_repository(tmp_path_factory.mktemp("repo"), ckpt, num_pages=NUM_PAGES, page_size=PAGE_SIZE,
                            max_concurrent_requests=BATCH, max_queued_requests=QUEUE, max_tokens_limit=1000,
                            default_mode="ar", threads=1, cancel_poll_ms=10)
    log = tmp_path_factory.mktemp("log") / "tritonserver.log"
    srv = TritonServer(repo, log_file=log)
    srv.start()
    yield srv
    srv.stop()
    assert srv.clean_exit, (srv.stop_report, log.read_text(errors="replace")[-3000:])
    assert "Traceback" not in log.read_text(errors="replace")


@pytest.fixture(scope="module")
def lm(ckpt):
    from trimode.runtime.api import TriModeLM

    return TriModeLM.from_pretrained(ckpt, num_pages=256, page_size=PAGE_SIZE)


def _stats(server) -> dict:
    from trimode.runtime.serving.client import StreamingClient

    with StreamingClient(server.grpc_url) as c:
        return c.stats()


def _wait_idle(server, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = _stats(server)
        if (s["requests_in_flight"] == 0 and s["pages_used"] == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def test_a_second_server_on_our_ports_is_never_taken_for_ready(server, tmp_path):
    from trimode.runtime.serving.server import ServingError, TritonServer

    assert server.is_own()
    other = TritonServer(server.repo, http_port=server.http_port, grpc_port=server.grpc_port,
                         metrics_port=server.metrics_port, log_file=tmp_path / "other.log", startup_timeout=60)
    with pytest.raises(ServingError) as e:
        other.start()
    assert "another tritonserver" in str(e.value) or "exited" in str(e.value), str(e.value)
    assert _stats(server)["server_pid"] == server.process.pid  # the first one still serves


def test_burst_is_refused_only_beyond_what_can_start_now(server, lm):
    """BATCH requests at once with a queue limit of QUEUE: they all fit the batch and the pages, so none is
    "busy"; a larger burst is refused only beyond batch + queue."""
    from trimode.runtime.serving.client import StreamingClient

    before = _stats(server)

    def burst(n: int, max_tokens: int) -> list:
        clients = [StreamingClient(server.grpc_url) for _ in range(n)]
        for c in clients:  # one stream each; sent back to back so that they reach the model together
            c.send(text_input="w5 w6", max_tokens=max_tokens, mode="ar")
        out = [c.receive(timeout=120) for c in clients]
        for c in clients:
            c.close()
        return out

    ref = lm.run([lm.request("w5 w6", 6, mode_config("ar"))])[0]
    small = burst(BATCH, 6)
    assert [r.error for r in small] == [None] * BATCH
    assert all(r.token_ids == ref.token_ids for r in small)
    big = burst(4 * BATCH, 60)
    busy = [r.error for r in big if r.error]
    assert all("server busy" in e for e in busy), busy
    assert len(big) - len(busy) >= BATCH + QUEUE  # at least what can run plus what may queue
    after = _wait_idle(server)
    assert after["rejected"] - before["rejected"] == len(busy)


def _post(server, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/trimode/generate_stream",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_one_validation_for_every_mode_and_front_door_and_every_refusal_counted(server, lm):
    from trimode.runtime.request import SpecConfig
    from trimode.runtime.serving.client import StreamingClient
    from trimode.runtime.serving.server import metrics

    before = _stats(server)
    refused = 0
    with StreamingClient(server.grpc_url) as c:
        for mode in ("ar", "diffusion", "spec"):
            for bad, words in ((dict(block_length=0), ["block_length"]),
                               (dict(block_length=2**31 - 1), ["block_length"]),
                               (dict(block_length=9), ["block_length", "8"]),  # over the checkpoint's block_size
                               (dict(threshold=math.nan), ["threshold"]), (dict(threshold=-0.5), ["threshold"]),
                               (dict(seed=-1), ["seed"])):
                r = c.generate(text_input="w5 w6", max_tokens=3, mode=mode, timeout=60, **bad)
                assert r.error is not None and all(w in r.error for w in words), (mode, bad, r.error)
                refused += 1
        # the LoRA drafter can be turned off per request
        for use_lora in (True, False):
            ref = lm.run([lm.request("w5 w6 w7", 12, SpecConfig(8, 0.0, use_lora))])[0]
            r = c.generate(text_input="w5 w6 w7", max_tokens=12, mode="spec", use_lora=use_lora)
            assert r.error is None and r.token_ids == ref.token_ids, (use_lora, r.error)
    # HTTP: a misspelled field is refused (400), not ignored; a bad value is a 400 too
    code, body = _post(server, {"text_input": "w5 w6", "max_token": 3})
    assert code == 400 and "max_token" in body and "unknown fields" in body, (code, body)
    code, body = _post(server, {"text_input": "w5 w6", "max_tokens": 3, "mode": "turbo"})
    assert code == 400 and "turbo" in body, (code, body)
    refused += 2
    code, body = _post(server, {"text_input": "w5 w6", "max_tokens": 3})
    assert code == 200 and '"error"' not in body and "finish_reason" in body, (code, body)
    after = _wait_idle(server)
    assert after["rejected"] - before["rejected"] == refused
    deadline = time.monotonic() + 10  # the gauges follow the stats
    while metrics(server.metrics_url)["trimode_requests_rejected"] != after["rejected"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metrics(server.metrics_url)["trimode_requests_rejected"] == after["rejected"]


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_huge_prompt_is_refused_before_tokenizing_beside_a_running_stream(server, lm):
    from trimode.runtime.serving.client import StreamingClient

    _wait_idle(server)
    stub = _stats(server)["pid"]
    rss_before = _rss_mb(stub)
    prompt = prompt_words(4, offset=9)
    ref = lm.run([lm.request(prompt, 200, mode_config("ar"))])[0]
    runner = StreamingClient(server.grpc_url)
    got = threading.Event()
    out = {}
    runner.send(text_input=prompt, max_tokens=200, mode="ar")
    t = threading.Thread(target=lambda: out.update(r=runner.receive(timeout=120, on_chunk=lambda ids: got.set())))
    t.start()
    assert got.wait(60)
    with StreamingClient(server.grpc_url) as c:
        huge = c.generate(text_input="w5 " * (10 * 2**20 // 3), max_tokens=4, timeout=120)
    t.join(120)
    runner.close()
    assert huge.error is not None and "bytes" in huge.error and "max_prompt_bytes" in huge.error, huge.error
    r = out["r"]
    assert r.error is None and r.token_ids == ref.token_ids  # the running stream was not disturbed
    assert _stats(server)["pid"] == stub  # the same backend process, still serving
    assert _rss_mb(stub) - rss_before < 150, (rss_before, _rss_mb(stub))  # nothing of the 10 MB kept

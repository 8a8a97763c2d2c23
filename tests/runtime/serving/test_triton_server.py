"""The Triton deployment against a real ``tritonserver`` (bundled in nvidia-pytriton) on loopback ports.

One server for the module: a random tiny checkpoint, a small KV page budget (so that 32 clients queue for
pages), tritonclient over gRPC (streaming) and HTTP (health, config, generate_stream).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
NUM_PAGES, PAGE_SIZE = 48, 4
BLOCK = 8  # tiny_config's block_size


def _ensure_backend_env() -> None:
    from trimode.runtime.serving.server import ServingError, find_triton_env

    try:
        find_triton_env()
        import tritonclient.grpc  # noqa: F401
        return
    except (ServingError, ImportError):
        pass
    # a fresh clone: create .venv-triton (nvidia-pytriton, numpy<2) and install tritonclient
    subprocess.run(["bash", str(ROOT / "scripts" / "setup_triton_env.sh")], check=True)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    _ensure_backend_env()
    from trimode.runtime.serving.repository import write_repository
    from trimode.runtime.serving.server import TritonServer

    repo = write_repository(tmp_path_factory.mktemp("repo"), ckpt, num_pages=NUM_PAGES, page_size=PAGE_SIZE,
                            max_concurrent_requests=8, max_tokens_limit=1000, default_mode="ar", threads=1,
                            cancel_poll_ms=10)
    log = tmp_path_factory.mktemp("log") / "tritonserver.log"
    srv = TritonServer(repo, log_file=log)
    srv.start()
    yield srv
    code = srv.stop()
    assert code is not None
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="module")
def lm(ckpt):
    from trimode.runtime.api import TriModeLM

    return TriModeLM.from_pretrained(ckpt, num_pages=256, page_size=PAGE_SIZE)


def client(server):
    from trimode.runtime.serving.client import StreamingClient

    return StreamingClient(server.grpc_url)


def stats(server) -> dict:
    with client(server) as c:
        return c.stats()


def wait_idle(server, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = stats(server)
        if (s["pages_used"] == 0 and s["requests_in_flight"] == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


def mode_config(mode: str, block: int = BLOCK, threshold: float | None = None):
    from trimode.runtime.request import ARConfig, DiffusionConfig, SpecConfig

    if mode == "ar":
        return ARConfig()
    if mode == "diffusion":
        return DiffusionConfig(block, "threshold", 0.9 if threshold is None else threshold)
    return SpecConfig(block, threshold or 0.0)


def prompt_words(n: int, offset: int = 0) -> str:
    return " ".join(f"w{4 + (offset + 7 * i) % 500}" for i in range(n))


# ---- exactness ----------------------------------------------------------------------------------------

CASES = [  # mode, block_length, threshold, max_tokens, prompt length
    ("ar", None, None, 20, 3),
    ("diffusion", None, None, 20, 5),
    ("diffusion", 4, 0.5, 13, 9),
    ("spec", None, None, 20, 3),
    ("spec", 4, 0.3, 17, 11),
]


@pytest.mark.parametrize("mode,block,threshold,max_tokens,plen", CASES)
def test_grpc_stream_matches_python_api(server, lm, mode, block, threshold, max_tokens, plen):
    prompt = prompt_words(plen, offset=plen)
    ref = lm.run([lm.request(prompt, max_tokens, mode_config(mode, block or BLOCK, threshold))])[0]
    with client(server) as c:
        r = c.generate(text_input=prompt, max_tokens=max_tokens, mode=mode, block_length=block, threshold=threshold)
    assert r.error is None, r.error
    assert r.token_ids == ref.token_ids
    assert r.text == lm.tokenizer.decode(ref.token_ids)
    assert r.finish_reason == ref.finish_reason
    assert r.counters["forwards"] == ref.forwards and r.counters["num_tokens"] == len(ref.token_ids)
    assert r.counters["accepted_lengths"] == ref.accepted_lengths
    assert r.chunks >= 2  # streamed, not one response at the end


def test_input_ids_stop_string_and_non_streaming(server, lm):
    ids = lm.encode(prompt_words(4, offset=3))
    ref = lm.run([lm.request(ids, 12, mode_config("spec"))])[0]
    with client(server) as c:
        whole = c.generate(input_ids=list(ids), max_tokens=12, mode="spec", stream=False)
        assert whole.error is None and whole.chunks == 1
        assert whole.token_ids == ref.token_ids and whole.text == ref.text
        # stop strings match the decoded text (a one-token string may also end inside an earlier, longer token);
        # the output ends before the first match (never emitted), its ids with the token that completed it
        one = lm.tokenizer.decode([ref.token_ids[4]])
        r = c.generate(input_ids=list(ids), max_tokens=12, mode="ar", stop=[one])
        cut = ref.text.find(one)
        assert r.finish_reason == "stop" and r.text == ref.text[:cut]
        done = next(n for n in range(1, 13) if len(lm.tokenizer.decode(ref.token_ids[:n])) >= cut + len(one))
        assert r.token_ids == ref.token_ids[:done]
        two = lm.tokenizer.decode(ref.token_ids[6:8])
        r = c.generate(input_ids=list(ids), max_tokens=12, mode="diffusion", stop=[two])
        ref_d = lm.run([lm.request(ids, 12, mode_config("diffusion"))])[0]
        cut = ref_d.text.find(two)
        if cut >= 0:
            assert r.finish_reason == "stop" and r.text == ref_d.text[:cut]
        else:
            assert r.text == ref_d.text


# ---- concurrency ---------------------------------------------------------------------------------------

def test_32_concurrent_mixed_clients(server, lm):
    modes = ["ar", "diffusion", "spec", "spec"]
    jobs = []
    for i in range(32):
        mode = modes[i % 4]
        jobs.append(dict(text_input=prompt_words(2 + i % 7, offset=11 * i), max_tokens=4 + (5 * i) % 21, mode=mode,
                         block_length=[None, 4, 8][i % 3] if mode != "ar" else None))
    refs = lm.run([lm.request(j["text_input"], j["max_tokens"], mode_config(j["mode"], j["block_length"] or BLOCK))
                   for j in jobs])
    results: dict[int, object] = {}
    barrier = threading.Barrier(32)

    def worker(i: int) -> None:
        with client(server) as c:
            barrier.wait()
            results[i] = c.generate(timeout=150, **jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 32
    for i, ref in enumerate(refs):
        r = results[i]
        assert r.error is None, (i, r.error)
        assert r.token_ids == ref.token_ids, (i, jobs[i])
        assert r.text == ref.text and r.finish_reason == ref.finish_reason
        assert r.counters["mode"] == jobs[i]["mode"]
    s = wait_idle(server)
    assert s["pages_used"] == 0 and s["pages_reserved"] == 0 and s["requests_in_flight"] == 0, s
    assert s["pages_free"] == NUM_PAGES


def test_kv_pressure_queues_without_errors_or_leaks(server, lm):
    # each request may need 20 of the 48 pages in the worst case: two run at a time, the others queue
    n = 4
    prompt = prompt_words(4, offset=5)
    ref = lm.run([lm.request(prompt, 76, mode_config("ar"))])[0]
    results: list = [None] * n
    seen_waiting = []

    def worker(i: int) -> None:
        with client(server) as c:
            results[i] = c.generate(text_input=prompt, max_tokens=76, mode="ar", timeout=150)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        s = stats(server)
        seen_waiting.append(s["requests_waiting"])
        assert s["pages_reserved"] <= NUM_PAGES and s["pages_used"] <= NUM_PAGES
        time.sleep(0.02)  # the four requests take well under a second on an idle machine
    for r in results:
        assert r.error is None and r.token_ids == ref.token_ids
    assert max(seen_waiting) >= 1  # some of them were queued for pages
    s = wait_idle(server)
    assert s["pages_used"] == 0 and s["requests_in_flight"] == 0, s


# ---- bad requests ---------------------------------------------------------------------------------------

def test_bad_requests_get_errors_and_the_server_carries_on(server, lm):
    from trimode.runtime.serving.client import make_input

    long_prompt = prompt_words(NUM_PAGES * PAGE_SIZE + 8)
    bad = [
        (dict(text_input="w5 w6", mode="turbo"), ["mode", "turbo"]),
        (dict(text_input="w5 w6", max_tokens=-4), ["max_tokens", "-4"]),
        (dict(text_input="w5 w6", max_tokens=0), ["max_tokens"]),
        (dict(text_input="w5 w6", max_tokens=2**31 - 1), ["max_tokens", "limit"]),
        (dict(text_input=long_prompt, max_tokens=4), ["prompt", "KV"]),
        (dict(text_input="w5 w6", temperature=float("nan")), ["temperature", "nan"]),
        (dict(text_input="w5 w6", top_p=0.0), ["top_p"]),
        (dict(text_input="w5 w6", mode="diffusion", threshold=1.5), ["threshold"]),
        (dict(text_input="w5 w6", mode="spec", block_length=-2), ["block_length"]),
        (dict(max_tokens=4), ["missing", "text_input"]),
        (dict(text_input=""), ["empty"]),
        (dict(input_ids=[5, 600000]), ["token ids", "vocabulary"]),
        (dict(text_input="w5", command="reboot"), ["command"]),
        ([make_input("text_input", "w5 w6"), make_input("max_tokens", 4.0, "FP32")], ["max_tokens", "INT32"]),
        ([make_input("text_input", [5, 6], "INT32")], ["text_input", "data-type"]),
        ([make_input("text_input", "w5"), make_input("mode", "ar"), make_input("mode", "spec")], ["mode"]),
    ]
    ok_ref = lm.run([lm.request("w9 w10", 3, mode_config("ar"))])[0]
    with client(server) as c:
        for request, words in bad:
            r = c.generate(request, timeout=60) if isinstance(request, list) else c.generate(timeout=60, **request)
            assert r.error is not None, request
            for word in words:
                assert word.lower() in r.error.lower(), (request, r.error)
            good = c.generate(text_input="w9 w10", max_tokens=3, mode="ar")
            assert good.error is None and good.token_ids == ok_ref.token_ids, (request, good.error)
    s = wait_idle(server)
    assert s["pages_used"] == 0 and s["requests_in_flight"] == 0, s


# ---- cancellation -----------------------------------------------------------------------------------------

_KILLED_CLIENT = """
import sys
from trimode.runtime.serving.client import StreamingClient
c = StreamingClient(sys.argv[1])
c.send(text_input=sys.argv[2], max_tokens=int(sys.argv[3]), mode="ar")
c.receive(timeout=60, on_chunk=lambda ids: (print("streaming", flush=True), sys.stdin.readline()))
"""


def test_killed_client_frees_its_pages(server):
    before = stats(server)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, server.grpc_url, prompt_words(6), "180"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "streaming"
        during = stats(server)
        assert during["requests_in_flight"] >= 1 and during["pages_used"] > 0, during
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    after = wait_idle(server)
    assert after["pages_used"] == 0 and after["requests_in_flight"] == 0, after
    assert after["cancelled"] == before["cancelled"] + 1, (before, after)
    assert after["tokens"] - before["tokens"] < 180  # stopped early, not run to the end


def test_client_cancel_mid_stream_frees_pages(server):
    from trimode.runtime.serving.client import StreamingClient

    before = stats(server)
    c = StreamingClient(server.grpc_url)
    got = threading.Event()
    c.send(text_input=prompt_words(5), max_tokens=180, mode="spec", block_length=4)
    threading.Thread(target=lambda: c.receive(timeout=60, on_chunk=lambda ids: got.set()), daemon=True).start()
    assert got.wait(60)
    c.close(cancel=True)
    after = wait_idle(server)
    assert after["pages_used"] == 0 and after["requests_in_flight"] == 0, after
    assert after["cancelled"] == before["cancelled"] + 1, (before, after)


# ---- HTTP -------------------------------------------------------------------------------------------------

def test_http_health_config_metrics_and_generate_stream(server, lm):
    import tritonclient.http as httpclient

    from trimode.runtime.serving.server import metrics

    c = httpclient.InferenceServerClient(server.http_url)
    try:
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("trimode")
        config = c.get_model_config("trimode")
        assert config["model_transaction_policy"]["decoupled"] is True
        assert config["parameters"]["num_pages"]["string_value"] == str(NUM_PAGES)
        names = {i["name"] for i in c.get_model_metadata("trimode")["inputs"]}
        assert {"text_input", "input_ids", "max_tokens", "mode", "stop", "stream"} <= names
    finally:
        c.close()
    ref = lm.run([lm.request("w5 w6 w7", 10, mode_config("spec"))])[0]
    body = json.dumps({"text_input": "w5 w6 w7", "max_tokens": 10, "mode": "spec"}).encode()
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/trimode/generate_stream", data=body,
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
    ids = [t for e in events for t in (e["output_ids"] if isinstance(e["output_ids"], list) else [e["output_ids"]])]
    assert ids == ref.token_ids and len(events) >= 2
    assert "".join(e["text_output"] for e in events) == ref.text
    assert events[-1]["finish_reason"] == ref.finish_reason
    wait_idle(server)
    m = metrics(server.metrics_url)
    assert m["trimode_kv_pages_total"] == NUM_PAGES and m["trimode_kv_pages_used"] == 0
    assert m["trimode_requests_in_flight"] == 0 and m["trimode_requests_completed"] >= 1


# ---- tensor parallelism: mpiexec -n 2 trimode serve --tp 2 ------------------------------------------------

def test_two_mpi_ranks_serve_what_one_process_computes(ckpt, lm, tmp_path):
    """Rank 0 runs tritonserver (its backend model is tensor-parallel rank 0), rank 1 serves its steps. Streams
    equal the single-process API in every mode, also after idling past the collective timeout (keepalives),
    and stopping the server releases the worker: the whole job exits 0."""
    from tp_helpers import _mpiexec

    from trimode.runtime.serving.client import StreamingClient

    _ensure_backend_env()
    cmd = [_mpiexec(), "-n", "2", sys.executable, "-m", "trimode.runtime.cli", "serve", "--tp", "2",
           "--tp-timeout", "4", "--model", ckpt, "--num-pages", str(NUM_PAGES), "--page-size", str(PAGE_SIZE),
           "--threads", "1", "--log-file", str(tmp_path / "tritonserver.log")]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(tmp_path / "job.err", "w"), text=True)
    try:
        ready = json.loads(job.stdout.readline())
        assert ready["ready"], ready

        def check(mode, plen):
            prompt = prompt_words(plen, offset=plen)
            ref = lm.run([lm.request(prompt, 14, mode_config(mode))])[0]
            with StreamingClient(ready["grpc"]) as c:
                r = c.generate(text_input=prompt, max_tokens=14, mode=mode)
            assert r.error is None, r.error
            assert r.token_ids == ref.token_ids and r.counters["forwards"] == ref.forwards

        for mode, plen in (("ar", 3), ("diffusion", 5), ("spec", 4)):
            check(mode, plen)
        time.sleep(6)  # idle longer than the 4 s collective timeout: rank 0's keepalives hold the group
        check("spec", 7)
        os.kill(ready["serve_pid"], signal.SIGTERM)
        assert job.wait(timeout=90) == 0, (tmp_path / "job.err").read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    log = (tmp_path / "tritonserver.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def test_thinking_budget_and_messages_inputs(server, lm):
    """The instruct inputs reach the model through config.pbtxt: the thinking budget forces its token at the
    budget (spec == AR with it); messages to a checkpoint without a chat template get a clear error."""
    ids = lm.encode(prompt_words(5, offset=1))
    ref = lm.run([lm.request(ids, 10, mode_config("ar"), max_thinking_tokens=4, end_think_token_id=9)])[0]
    assert ref.token_ids[4] == 9
    with client(server) as c:
        r = c.generate(input_ids=list(ids), max_tokens=10, mode="spec", max_thinking_tokens=4, end_think_token_id=9)
        assert r.error is None and r.token_ids == ref.token_ids
        fused = c.generate(input_ids=list(ids), max_tokens=10, mode="fused_spec", num_subblocks=2, subblock_length=2,
                           max_thinking_tokens=4, end_think_token_id=9)
        assert fused.error is None and fused.token_ids == ref.token_ids and fused.counters["forwards"]["verify"] > 0
        bad = c.generate(messages=[{"role": "user", "content": "w5"}], max_tokens=4)
        assert bad.error is not None and "chat template" in bad.error
        assert c.generate(input_ids=list(ids), max_tokens=3).error is None  # still serving

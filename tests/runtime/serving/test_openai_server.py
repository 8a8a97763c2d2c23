"""``trimode serve-openai`` for real: one server process per module on 127.0.0.1 (a free port), serving the shipped
tiny-kjv checkpoint, driven by the official ``openai`` client (and httpx for raw bodies). Greedy answers are compared
with the Python API's for the same prompt and mode."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from trimode.runtime.api import TriModeLM
from trimode.runtime.request import mode_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "models" / "tiny-kjv"
NAME = "tiny-kjv"
MODES = ("ar", "diffusion", "spec")
PROMPTS = ["In the beginning", "And the LORD said unto Moses", "Blessed are the", "For God so loved",
           "The LORD is my shepherd", "And it came to pass", "Then Jesus said", "Behold, I"]
MAIN = "from trimode.runtime.cli.main import main; import sys; sys.exit(main(sys.argv[1:]))"


def start_server(log: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """``trimode serve-openai`` on tiny-kjv on a free port of 127.0.0.1 (stderr into ``log``): the process and its
    base URL, once it prints its ready line."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", MAIN, "serve-openai", "--model", str(MODEL), "--port", "0",
                                 "--threads", "1", "--log-level", "warning", *options],
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    line = proc.stdout.readline()  # the ready line, or "" if it died
    if not line:
        proc.wait()
        pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    ready = json.loads(line)
    assert ready["ready"] and ready["model"] == NAME and ready["url"].startswith("http://127.0.0.1:")
    return proc, ready["url"].removesuffix("/v1")


def stop_server(proc: subprocess.Popen, log: Path, signalled: bool = False) -> dict:
    """SIGTERM (unless ``signalled`` already); it must exit with status 0 and no traceback. Returns its last
    line's ``stopped`` report."""
    if not signalled:
        proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=30)[0]
    text = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in text, text[-3000:]
    stopped = json.loads(rest.splitlines()[-1])["stopped"]
    assert stopped["signal"] == "SIGTERM", stopped
    return stopped


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The module's server (base URL); at the end it must stop cleanly on SIGTERM."""
    log = tmp_path_factory.mktemp("openai") / "server.log"
    proc, url = start_server(log, "--max-tokens-limit", "500")
    try:
        yield url
    finally:
        stopped = stop_server(proc, log)
    assert stopped["errors"] == 0, stopped


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lm():
    return TriModeLM.from_pretrained(MODEL)


def reference(lm, prompts, max_tokens, modes, **kw):
    """The Python API's greedy results for ``prompts`` (text, or a conversation) in ``modes`` (one per prompt)."""
    return lm.run([lm.request(p, n, mode_config(m, lm.default_block_length), **kw)
                   for p, n, m in zip(prompts, max_tokens, modes)])


def stats(server) -> dict:
    return httpx.get(server + "/stats").json()


def stats_when_idle(server, timeout: float = 30.0) -> dict:
    """The stats once no request is in flight and every page is free (or when ``timeout`` s have passed)."""
    deadline = time.monotonic() + timeout
    while True:
        st = stats(server)
        if (st["requests_in_flight"] == 0 and st["pages_free"] == st["num_pages"]) or time.monotonic() >= deadline:
            return st
        time.sleep(0.05)


def test_models_health_and_stats(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    health = httpx.get(server + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    st = stats(server)
    assert st["model"] == NAME and st["pages_free"] == st["num_pages"] > 0
    for r, status in ((httpx.get(server + "/v1/nothing"), 404), (httpx.get(server + "/v1/completions"), 405)):
        assert r.status_code == status and r.json()["error"]["message"], r.text  # OpenAI's error shape


@pytest.mark.parametrize("mode", MODES + ("fused_spec", "auto"))
def test_completions_match_the_python_api(client, lm, mode):
    prompt = PROMPTS[(MODES + ("fused_spec", "auto")).index(mode)]
    ref = reference(lm, [prompt], [24], [mode])[0]
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, extra_body={"mode": mode})
    choice = out.choices[0]
    assert (choice.text, choice.finish_reason) == (ref.text, ref.finish_reason)
    assert out.object == "text_completion" and out.model == NAME
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ref.prompt_ids), len(ref.token_ids))
    counters = out.usage.model_extra["trimode"]
    assert counters["mode"] == mode and counters["num_tokens"] == len(ref.token_ids)
    assert counters["num_forwards"] == sum(counters["forwards"].values()) >= 2

    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"mode": mode}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


@pytest.mark.parametrize("mode", MODES)
def test_chat_matches_the_python_api(client, lm, mode):
    messages = [{"role": "system", "content": "Answer in the words of the King James Bible."},
                {"role": "user", "content": PROMPTS[3 + MODES.index(mode)]}]
    ref = reference(lm, [messages], [20], [mode])[0]
    out = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=20, temperature=0,
                                         extra_body={"mode": mode})
    choice = out.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", ref.text,
                                                                                  ref.finish_reason)
    assert out.object == "chat.completion" and out.usage.prompt_tokens == len(ref.prompt_ids)

    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, stream=True,
                                            extra_body={"mode": mode})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_stop_strings_end_the_text_before_the_match(client, lm):
    prompt = PROMPTS[1]
    full = reference(lm, [prompt], [40], ["spec"])[0].text
    stop = full.split()[3]  # a word of the answer: the text ends right before its first occurrence
    ref = lm.run([lm.request(prompt, 40, mode_config("spec", lm.default_block_length), stop=[stop])])[0]
    assert ref.finish_reason == "stop" and stop not in ref.text and full.startswith(ref.text)
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, stop=[stop, "never appears"])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (ref.text, "stop")
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=40, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text and chunks[-1].choices[0].finish_reason == "stop"


def test_sixteen_concurrent_streams_match_the_python_api(server, client, lm):
    n = 16
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    modes = [MODES[i % 3] for i in range(n)]
    max_tokens = [8 + (5 * i) % 23 for i in range(n)]
    refs = reference(lm, prompts, max_tokens, modes)
    texts, reasons, errors = [None] * n, [None] * n, []

    def one(i: int) -> None:
        try:
            stream = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=max_tokens[i], stream=True,
                                               extra_body={"mode": modes[i]})
            chunks = list(stream)
            texts[i] = "".join(c.choices[0].text for c in chunks)
            reasons[i] = chunks[-1].choices[0].finish_reason
        except openai.OpenAIError as e:  # reported below, with the request it belongs to
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert texts == [r.text for r in refs] and reasons == [r.finish_reason for r in refs]
    st = stats(server)
    assert st["requests_in_flight"] == 0 and st["pages_used"] == 0


BAD = [  # (path, body (a dict, or raw text), the field the error must name)
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, "model"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "n": 2}, "n"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 501}, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "temperature": -1}, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "temperature": "hot"}, "temperature"),
    ("/v1/completions", '{"model": "tiny-kjv", "prompt": "a",', None),
    ("/v1/completions", {"model": NAME, "prompt": "a", "mode": "fast"}, "mode"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "logprobs": 1}, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_token": 5}, "max_token"),
    ("/v1/completions", {"model": NAME, "prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [5, 99999]}, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "stop": [""]}, "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "block_length": 0}, "block_length"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "mode": "fused_spec", "num_subblocks": 99}, "num_subblocks"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "mode": "spec", "threshold": 0.5, "temperature": 1},
     "threshold"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
]


def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_keeps_serving(server, client, lm):
    before = stats(server)["rejected"]
    for path, body, param in BAD:
        if isinstance(body, str):
            r = httpx.post(server + path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = httpx.post(server + path, json=body)
        error = r.json()["error"]
        assert r.status_code == (404 if param == "model" else 400), (body, r.text)
        assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error", (body, error)
        if param is not None:
            assert param.split("[")[0] in error["message"] or param == "model", (body, error)
    deadline = time.monotonic() + 10  # the service counts refusals on its loop thread
    while stats(server)["rejected"] < before + len(BAD) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stats(server)["rejected"] == before + len(BAD)
    # the official client maps them to its exceptions
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="a")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=2)
    assert e.value.body["param"] == "n"
    # and the server still answers as the API does
    ref = reference(lm, [PROMPTS[0]], [10], ["spec"])[0]
    assert client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=10).choices[0].text == ref.text


def test_a_client_gone_mid_stream_frees_its_pages(server, client):
    before = stats(server)
    stream = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=480, stream=True,
                                       extra_body={"mode": "ar", "ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    stream.close()  # the client goes away with ~480 tokens still to generate
    st = stats_when_idle(server)
    assert st["requests_in_flight"] == 0 and st["pages_free"] == st["num_pages"] and st["pages_reserved"] == 0, st
    assert st["cancelled"] == before["cancelled"] + 1 and st["completed"] == before["completed"], st


def test_a_client_gone_while_waiting_for_a_whole_answer_frees_its_pages(server):
    before = stats(server)
    body = {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 480, "mode": "ar", "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 480 tokens and closes the connection
        httpx.post(server + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.3))
    st = stats_when_idle(server)
    assert st["requests_in_flight"] == 0 and st["pages_free"] == st["num_pages"], st
    assert st["cancelled"] == before["cancelled"] + 1 and st["completed"] == before["completed"], st


class _Hold:
    """A sink for requests submitted to the service directly: it only records how they end."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def on_tokens(self, ids):
        return True

    def on_finish(self, result, timing):
        self.done.set()

    def on_error(self, message, code):
        self.done.set()

    def is_cancelled(self):
        return False


def test_a_full_queue_and_a_draining_service_answer_503(lm):
    """In process (the app over its own service): the queue limit and the drain map to 503 in OpenAI's shape."""
    from fastapi.testclient import TestClient
    from trimode.runtime.request import ARConfig
    from trimode.runtime.serving.engine_service import EngineService
    from trimode.runtime.serving.openai_server import create_app

    small = TriModeLM.from_pretrained(MODEL, max_batch_size=1)
    service = EngineService(small, max_queued=1)
    http = TestClient(create_app(service, small, NAME, default_mode="ar"))
    holds = [_Hold(), _Hold()]  # one request runs, one waits for the batch slot: the queue is full
    handles = [service.submit(small.request(PROMPTS[0], 480, ARConfig(), eos_token_ids=()), h) for h in holds]
    r = http.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 4})
    assert r.status_code == 503 and "server busy" in r.json()["error"]["message"], r.text
    for handle, hold in zip(handles, holds):
        service.cancel(handle)
        assert hold.done.wait(30)
    assert http.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 4}).status_code == 200
    service.drain()
    r = http.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 503 and r.json()["error"]["message"] == "the server is shutting down", r.text
    assert http.get("/health").status_code == 503
    service.close()


def test_sigterm_ends_the_streams_in_flight_and_exits_cleanly(tmp_path):
    log = tmp_path / "server.log"
    proc, url = start_server(log, "--graceful-timeout", "0")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=480, stream=True,
                                       extra_body={"mode": "ar", "ignore_eos": True})
    texts = [next(iter(stream)).choices[0].text]
    proc.send_signal(signal.SIGTERM)  # with ~480 tokens still to generate
    with pytest.raises(openai.APIError, match="the server is shutting down"):
        texts += [c.choices[0].text for c in stream]  # the stream's last event is that error
    stopped = stop_server(proc, log, signalled=True)
    assert stopped["errors"] == 1 and stopped["completed"] == 0, stopped

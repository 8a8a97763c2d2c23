"""The serving layer without a server: the engine loop thread (EngineService), request parsing, streaming
assembly and the repository generator. The real Triton server is exercised in test_triton_server.py."""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import pytest

from conftest import make_lm
from trimode.runtime.request import ARConfig, DiffusionConfig, SpecConfig
from trimode.runtime.serving.engine_service import EngineService
from trimode.runtime.serving.triton_request import PARAMETERS, parse_parameters, parse_request
from trimode.runtime.stopping import OutputAssembler

PARAMS = parse_parameters({"max_tokens_limit": "500", "default_max_tokens": "7", "default_mode": "spec"})


class Collect:
    """A sink that records everything; optionally reports itself cancelled after some tokens."""

    def __init__(self, cancel_after: int | None = None, stop_after: int | None = None) -> None:
        self.ids: list[int] = []
        self.result = self.timing = self.error = None
        self.done = threading.Event()
        self.cancel_after, self.stop_after = cancel_after, stop_after

    def on_tokens(self, ids):
        self.ids.extend(ids)
        return not (self.stop_after is not None and len(self.ids) >= self.stop_after)

    def on_finish(self, result, timing):
        self.result, self.timing = result, timing
        self.done.set()

    def on_error(self, message, code="INTERNAL"):
        self.error = message
        self.done.set()

    def is_cancelled(self):
        return self.cancel_after is not None and len(self.ids) >= self.cancel_after


MODES = [ARConfig(), DiffusionConfig(8, "threshold", 0.9), SpecConfig(8, 0.0), SpecConfig(4, 0.5),
         DiffusionConfig(4, "threshold", 0.3)]


def test_concurrent_submissions_match_the_python_api(ckpt):
    lm = make_lm(ckpt, num_pages=64, max_batch_size=4)
    ref_lm = make_lm(ckpt)
    requests = [lm.request([5 + i, 9 + 2 * i, 40 + i][: 1 + i % 3], 5 + (3 * i) % 11, MODES[i % len(MODES)])
                for i in range(12)]
    refs = ref_lm.run(requests)
    service = EngineService(lm)
    sinks = [Collect() for _ in requests]
    threads = [threading.Thread(target=service.submit, args=(r, s)) for r, s in zip(requests, sinks)]
    for t in threads:
        t.start()
    for s in sinks:
        assert s.done.wait(60)
    for s, ref in zip(sinks, refs):
        assert s.error is None
        assert s.ids == ref.token_ids == s.result.token_ids
        assert s.result.finish_reason == ref.finish_reason and s.result.text == ref.text
        assert s.timing["ttft_s"] is not None and s.timing["latency_s"] >= s.timing["ttft_s"]
    assert service.wait_idle()
    st = service.stats()
    assert st["pages_used"] == 0 and st["pages_reserved"] == 0 and st["completed"] == 12
    service.close()


def test_reserve_admission_queues_instead_of_exhausting(ckpt):
    lm = make_lm(ckpt, num_pages=12)  # 48 tokens: two 20-token requests at a time
    service = EngineService(lm, admission="reserve")
    sinks = [Collect() for _ in range(5)]
    for i, s in enumerate(sinks):
        service.submit(lm.request([7 + i, 8], 18, ARConfig()), s)
    max_used = 0
    while not all(s.done.is_set() for s in sinks):
        max_used = max(max_used, service.stats()["pages_reserved"])
        time.sleep(0.005)
    assert all(s.error is None and len(s.ids) == 18 for s in sinks)
    assert max_used <= 12
    assert service.wait_idle() and service.stats()["pages_used"] == 0
    big = Collect()
    service.submit(lm.request([5] * 40, 20, ARConfig()), big)
    assert big.done.wait(10) and "KV page budget is 12 pages" in big.error
    service.close()


def test_greedy_admission_fails_clearly_and_leaks_nothing(ckpt):
    lm = make_lm(ckpt, num_pages=10)
    service = EngineService(lm, admission="greedy")
    sinks = [Collect() for _ in range(4)]
    for i, s in enumerate(sinks):
        service.submit(lm.request([7 + i, 8, 9], 30, ARConfig()), s)
    for s in sinks:
        assert s.done.wait(60)
    errors = [s.error for s in sinks if s.error]
    assert errors and all("KV cache exhausted" in e for e in errors)
    assert any(s.result is not None and len(s.result.token_ids) == 30 for s in sinks)
    assert service.wait_idle()
    st = service.stats()
    assert st["pages_used"] == 0 and st["errors"] == len(errors)
    service.close()


def test_cancel_stop_and_close(ckpt):
    lm = make_lm(ckpt, num_pages=64)
    service = EngineService(lm, cancel_poll_s=0.0)
    gone = Collect(cancel_after=3)
    service.submit(lm.request([5, 6], 200, SpecConfig(4, 0.0)), gone)
    assert gone.done.wait(30)
    assert gone.result.finish_reason == "cancelled" and len(gone.result.token_ids) < 200
    stopped = Collect(stop_after=5)
    service.submit(lm.request([5, 6], 100, ARConfig()), stopped)
    assert stopped.done.wait(30) and stopped.result.finish_reason == "stop"
    handle_sink = Collect()
    handle = service.submit(lm.request([5, 6], 200, ARConfig()), handle_sink)
    service.cancel(handle)
    assert handle_sink.done.wait(30) and handle_sink.result.finish_reason == "cancelled"
    assert service.wait_idle() and service.stats()["pages_used"] == 0
    running = Collect()
    service.submit(lm.request([5, 6], 200, ARConfig()), running)
    while not running.ids:
        time.sleep(0.001)
    service.close()
    assert running.done.is_set() and "shutting down" in running.error
    assert lm.cache.stats().num_used_pages == 0


def test_queue_limit_rejects(ckpt):
    lm = make_lm(ckpt, num_pages=8)
    service = EngineService(lm, max_queued=2)
    sinks = [Collect() for _ in range(6)]
    for i, s in enumerate(sinks):
        service.submit(lm.request([5, 6], 20, ARConfig()), s)
    for s in sinks:
        assert s.done.wait(60)
    busy = [s.error for s in sinks if s.error]
    assert busy and all("server busy" in e and "max_queued_requests=2" in e for e in busy)
    service.close()


# ---- request parsing ------------------------------------------------------------------------------------

def s(text):
    return np.array([text.encode()], dtype=np.object_)


def i32(*v):
    return np.array(v, dtype=np.int32)


def f32(v):
    return np.array([v], dtype=np.float32)


def test_parse_defaults_and_modes(ckpt):
    lm = make_lm(ckpt)
    p = parse_request({"text_input": s("w5 w6 w7")}, lm, PARAMS)
    assert p.request.prompt_ids == (5, 6, 7) and p.request.max_new_tokens == 7 and p.stream
    assert p.request.mode == SpecConfig(lm.config.block_size, 0.0) and p.mode == "spec"
    p = parse_request({"input_ids": i32(5, 6), "mode": s("diffusion"), "block_length": i32(4),
                       "threshold": f32(0.5), "max_tokens": i32(9), "stream": np.array([False])}, lm, PARAMS)
    assert p.request.mode == DiffusionConfig(4, "threshold", 0.5) and not p.stream
    p = parse_request({"input_ids": i32(5), "mode": s("ar"), "temperature": f32(0.7), "top_p": f32(0.9),
                       "seed": np.array([3], dtype=np.int64), "stop": np.array([b"w9", b"w10 w11"], dtype=object)},
                      lm, PARAMS)
    assert p.request.sampling.temperature == pytest.approx(0.7) and p.request.sampling.seed == 3
    # stop strings are matched on the text, even when one token spells them; by id only for special tokens
    assert 9 not in p.request.stop_token_ids and p.stop_strings == ("w9", "w10 w11")
    special = lm.tokenizer.mask_token  # any special token: decoding skips it, so it is stopped on by id
    p = parse_request({"input_ids": i32(5), "stop": np.array([special.encode()], dtype=object)}, lm, PARAMS)
    assert p.request.stop_token_ids == frozenset(lm.config.eos_token_ids) | {lm.tokenizer.token_to_id(special)}
    assert parse_request({"command": s("stats")}, lm, PARAMS).command == "stats"


@pytest.mark.parametrize("inputs,words", [
    ({"text_input": s("w5"), "mode": s("fast")}, ["unknown mode", "fast"]),
    ({"text_input": s("w5"), "max_tokens": i32(-1)}, ["max_tokens", ">= 1"]),
    ({"text_input": s("w5"), "max_tokens": i32(501)}, ["max_tokens", "limit of 500"]),
    ({"text_input": s("w5"), "temperature": f32(float("nan"))}, ["temperature", "nan"]),
    ({"text_input": s("w5"), "seed": np.array([-1], dtype=np.int64)}, ["seed"]),
    ({"max_tokens": i32(3)}, ["missing input"]),
    ({"text_input": s("   ")}, ["empty"]),
    ({"input_ids": np.zeros(0, dtype=np.int32)}, ["input_ids", "empty"]),
    ({"text_input": s("w5"), "input_ids": i32(5)}, ["give one of", "text_input and input_ids"]),
    ({"text_input": s("w5"), "max_tokens": np.array([2.0], dtype=np.float32)}, ["max_tokens", "integer"]),
    ({"text_input": s("w5"), "mode": np.array([b"ar", b"spec"], dtype=object)}, ["mode", "one value"]),
    ({"text_input": np.array([b"\xff\xfe"], dtype=object)}, ["UTF-8"]),
    ({"text_input": s("w5"), "stop": np.array([b""], dtype=object)}, ["stop"]),
    ({"text_input": s("w5"), "flavour": s("x")}, ["unknown inputs", "flavour"]),
])
def test_parse_errors_name_the_problem(ckpt, inputs, words):
    lm = make_lm(ckpt)
    with pytest.raises(ValueError) as e:
        parse_request(inputs, lm, PARAMS)
    for word in words:
        assert word in str(e.value), str(e.value)


def test_parameters():
    assert set(parse_parameters({})) == set(PARAMETERS)
    with pytest.raises(ValueError, match="num_pages"):
        parse_parameters({"num_pages": "many"})
    with pytest.raises(ValueError, match="unknown"):
        parse_parameters({"nmu_pages": "4"})


def test_output_assembler_stop_strings(ckpt):
    """The Triton model's output assembly (runtime.stopping.OutputAssembler): the match is never emitted, and a
    tail that may still become it is held back while streaming."""
    lm = make_lm(ckpt)
    out = OutputAssembler(lm.tokenizer, ("w7 w8",))
    assert out.push([5, 6]) and out.take() == ("w5 w6", [5, 6])
    assert out.push([7]) is True and out.take() == (" ", [7])  # "w7" may start the stop string: held back
    assert out.push([8, 9, 10]) is False and out.stop_string == "w7 w8"
    assert out.take() == ("", [8]) and out.push([11]) is False and out.text == "w5 w6 "
    out = OutputAssembler(lm.tokenizer, ("w7 w8",))
    assert out.push([5, 7]) and out.take() == ("w5 ", [5, 7]) and out.finish() == ("w7", [])  # no match: released
    plain = OutputAssembler(None)
    assert plain.push([1, 2]) and plain.take() == ("", [1, 2])


def test_repository_generator_and_cli(ckpt, tmp_path):
    from trimode.runtime.cli.serve import add_subparsers

    parser = argparse.ArgumentParser()
    add_subparsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["triton-repo", "--model", ckpt, "--out", str(tmp_path / "repo"), "--num-pages", "99",
                              "--kv-admission", "greedy", "--copy-model"])
    assert args.handler(args) == 0
    config = (tmp_path / "repo" / "trimode" / "config.pbtxt").read_text()
    assert "decoupled: true" in config and 'backend: "python"' in config and "KIND_CPU" in config
    assert 'key: "num_pages"\n  value: { string_value: "99" }' in config
    assert 'string_value: "checkpoint"' in config and 'string_value: "greedy"' in config
    assert (tmp_path / "repo" / "trimode" / "1" / "checkpoint" / "config.json").exists()
    assert "TritonPythonModel" in (tmp_path / "repo" / "trimode" / "1" / "model.py").read_text()
    with pytest.raises(ValueError, match="kv_admission"):
        from trimode.runtime.serving.repository import write_repository
        write_repository(tmp_path / "r2", ckpt, kv_admission="lazy")

"""Serving limits without a server: the engine loop's queue limit (only what cannot start now is queued), drain
and refusal counting; one validation of Triton requests in every mode (bounds from the model and the engine,
sizes checked before tokenizing, unknown fields refused, the LoRA drafter per request). The same behaviour
against a real tritonserver is in test_triton_lifecycle.py."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from conftest import make_lm
from trimode.runtime.request import ARConfig, SpecConfig
from trimode.runtime.serving.engine_service import EngineService, ServiceClosed
from trimode.runtime.serving.triton_request import (check_request_parameters, parse_parameters, parse_request,
                                                    request_limits)

PARAMS = parse_parameters({"max_tokens_limit": "500", "default_max_tokens": "7", "default_mode": "spec"})


class Sink:
    def __init__(self) -> None:
        self.ids, self.result, self.error, self.code = [], None, None, None
        self.done = threading.Event()

    def on_tokens(self, ids):
        self.ids.extend(ids)

    def on_finish(self, result, timing):
        self.result = result
        self.done.set()

    def on_error(self, message, code):
        self.error, self.code = message, code
        self.done.set()

    def is_cancelled(self):
        return False


def _burst(service: EngineService, lm, n: int, max_tokens: int) -> list[Sink]:
    sinks = [Sink() for _ in range(n)]
    with service._cv:  # all of them in one inbox: the loop sees them arrive together
        for i, s in enumerate(sinks):
            service.submit(lm.request([5 + i, 6], max_tokens, ARConfig()), s)
    for s in sinks:
        assert s.done.wait(60)
    return sinks


def test_queue_limit_counts_only_requests_that_cannot_start_now(ckpt):
    lm = make_lm(ckpt, num_pages=256, max_batch_size=4)
    service = EngineService(lm, max_queued=1)
    try:
        fits = _burst(service, lm, 4, 30)  # exactly the batch: nothing is queued, nothing is busy
        assert [s.error for s in fits] == [None] * 4
        more = _burst(service, lm, 10, 30)  # 4 start, 1 may queue, 5 are refused
        busy = [s.error for s in more if s.error]
        assert len(busy) == 5 and all("server busy" in e and "max_queued_requests=1" in e for e in busy), busy
        assert {s.code for s in more if s.error} == {"UNAVAILABLE"}  # retry later: not the request's fault
        assert service.wait_idle() and service.stats()["rejected"] == 5
    finally:
        service.close()


def test_queue_limit_counts_requests_waiting_for_pages(ckpt):
    lm = make_lm(ckpt, num_pages=12, max_batch_size=8)  # 48 tokens: two 20-token requests at a time
    service = EngineService(lm, max_queued=2)
    try:
        sinks = _burst(service, lm, 6, 18)  # 2 start, 2 wait for pages, 2 are refused
        busy = [s.error for s in sinks if s.error]
        assert len(busy) == 2 and all("server busy" in e for e in busy), busy
    finally:
        service.close()


def test_drain_ends_everything_in_flight_and_refuses_new_requests(ckpt):
    lm = make_lm(ckpt, num_pages=128, max_batch_size=2)
    service = EngineService(lm)
    try:
        sinks = [Sink() for _ in range(4)]  # two running, two waiting
        for i, s in enumerate(sinks):
            service.submit(lm.request([5 + i, 6], 200, SpecConfig(4, 0.0)), s)
        deadline = time.monotonic() + 30
        while not sinks[0].ids and not sinks[0].done.is_set() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert sinks[0].ids and not sinks[0].done.is_set()
        assert service.drain(timeout=30)
        assert all(s.done.is_set() and "the server is shutting down" in s.error for s in sinks)
        assert {s.code for s in sinks} == {"UNAVAILABLE"}
        with pytest.raises(ServiceClosed, match="shutting down"):
            service.submit(lm.request([5, 6], 4, ARConfig()), Sink())
        st = service.stats()  # the loop still answers
        assert st["pages_used"] == 0 and st["requests_in_flight"] == 0 and service.draining
        assert lm.cache.stats().num_used_pages == 0
    finally:
        service.close()


def test_refusals_outside_the_service_are_counted(ckpt):
    lm = make_lm(ckpt)
    service = EngineService(lm)
    try:
        service.count_rejected()
        service.count_rejected(2)
        deadline = time.monotonic() + 10
        while service.stats()["rejected"] != 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert service.stats()["rejected"] == 3
    finally:
        service.close()


# ---- request validation ------------------------------------------------------------------------------------

def s(text):
    return np.array([text.encode()], dtype=np.object_)


def test_limits_come_from_the_model_and_the_engine(ckpt):
    lm = make_lm(ckpt, num_pages=16, page_size=4)
    limits = request_limits(lm, PARAMS)
    assert limits.max_prompt_tokens == min(lm.engine.max_positions, 16 * 4) - 1
    assert limits.max_block_length == lm.config.block_size
    longest = max(len(t.encode()) for t in lm.tokenizer.backend.get_vocab(with_added_tokens=True))
    assert limits.max_prompt_bytes == limits.max_prompt_tokens * (longest + 1)
    own = request_limits(lm, parse_parameters({"max_block_length": "32", "max_prompt_bytes": "100"}))
    assert own.max_block_length == 32 and own.max_prompt_bytes == 100
    with pytest.raises(ValueError, match="max_block_length"):
        request_limits(lm, parse_parameters({"max_block_length": "-1"}))


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
@pytest.mark.parametrize("extra,words", [
    ({"block_length": np.array([0], dtype=np.int32)}, ["block_length", "1 .. 8"]),
    ({"block_length": np.array([2**31 - 1], dtype=np.int32)}, ["block_length", "2147483647"]),
    ({"block_length": np.array([9], dtype=np.int32)}, ["block_length", "max_block_length"]),
    ({"threshold": np.array([math.nan], dtype=np.float32)}, ["threshold", "nan"]),
    ({"threshold": np.array([1.5], dtype=np.float32)}, ["threshold"]),
    ({"seed": np.array([-1], dtype=np.int64)}, ["seed"]),
    ({"use_lora": np.array([1], dtype=np.int32)}, ["use_lora", "BOOL"]),
])
def test_the_same_checks_in_every_mode(ckpt, mode, extra, words):
    lm = make_lm(ckpt)
    with pytest.raises(ValueError) as e:
        parse_request({"text_input": s("w5 w6"), "mode": s(mode), **extra}, lm, PARAMS)
    for word in words:
        assert word in str(e.value), str(e.value)


def test_prompt_sizes_are_checked_before_tokenizing(ckpt, monkeypatch):
    lm = make_lm(ckpt, num_pages=16, page_size=4)
    limits = request_limits(lm, PARAMS)

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized a prompt that is over the byte limit")

    huge = "w5 " * (limits.max_prompt_bytes // 3 + 1)
    monkeypatch.setattr(lm, "encode", no_tokenizing)
    with pytest.raises(ValueError, match="max_prompt_bytes"):
        parse_request({"text_input": s(huge)}, lm, PARAMS, limits)
    with pytest.raises(ValueError, match=f"at most {limits.max_prompt_tokens} tokens"):
        parse_request({"input_ids": np.full(limits.max_prompt_tokens + 1, 5, dtype=np.int32)}, lm, PARAMS, limits)
    monkeypatch.undo()
    # under the byte limit but over the token limit: refused after tokenizing, naming the token count
    words = "w5 " * (limits.max_prompt_tokens + 1)
    with pytest.raises(ValueError, match="the prompt is"):
        parse_request({"text_input": s(words)}, lm, PARAMS, limits)


def test_use_lora_and_commands(ckpt):
    lm = make_lm(ckpt)
    p = parse_request({"text_input": s("w5"), "mode": s("spec"), "use_lora": np.array([False])}, lm, PARAMS)
    assert p.request.mode == SpecConfig(lm.config.block_size, 0.0, use_lora=False)
    p = parse_request({"text_input": s("w5"), "mode": s("spec")}, lm, PARAMS)
    assert p.request.mode.use_lora is True
    p = parse_request({"command": s("drain abc123")}, lm, PARAMS)
    assert p.command == "drain" and p.argument == "abc123" and p.request is None
    with pytest.raises(ValueError, match="stats, drain"):
        parse_request({"command": s("reboot")}, lm, PARAMS)


def test_request_parameters_are_refused():
    check_request_parameters({})
    with pytest.raises(ValueError) as e:
        check_request_parameters({"max_token": 3})
    assert "max_token" in str(e.value) and "max_tokens" in str(e.value)  # names the field and the known inputs


def test_error_codes_tell_retry_from_bad_request(ckpt):
    """The service says whose fault a refusal is: a request that can never run here (larger than the page
    budget, beyond the model's positions) is INVALID_ARG; busy and shutting down are UNAVAILABLE (above)."""
    lm = make_lm(ckpt, num_pages=8, max_batch_size=2)
    big = make_lm(ckpt, num_pages=8, max_batch_size=2)
    services = [EngineService(lm), EngineService(big, admission="greedy")]  # greedy: no page check first
    try:
        too_big, too_long = Sink(), Sink()
        services[0].submit(lm.request([5, 6], 8 * lm.cache.page_size, ARConfig()), too_big)
        services[1].submit(big.request([5, 6], big.config.max_position_embeddings, ARConfig()), too_long)
        assert too_big.done.wait(30) and too_long.done.wait(30)
        assert "request too large" in too_big.error and too_big.code == "INVALID_ARG"
        assert "exceeds" in too_long.error and too_long.code == "INVALID_ARG", too_long.error
    finally:
        for service in services:
            service.close()

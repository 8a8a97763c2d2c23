"""Stop strings are matched on the decoded text (runtime.stopping), whatever tokens spell them; the Triton model's
stream assembly and request parsing use that one implementation."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from trimode.runtime.api import TriModeLM
from trimode.runtime.serving.engine_service import EngineService
from trimode.runtime.serving.triton_model import StreamAssembler
from trimode.runtime.serving.triton_request import parse_parameters, parse_request
from trimode.runtime.stopping import StopStringError, StopStringMatcher, check_stop_strings, special_stop_ids

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-kjv"
PARAMS = parse_parameters({"default_max_tokens": "40", "default_mode": "ar"})


@pytest.fixture(scope="module")
def kjv() -> TriModeLM:
    return TriModeLM.from_pretrained(MODEL, num_pages=64)


def test_matcher_cuts_at_the_earliest_ending_match():
    m = StopStringMatcher(["unto"])
    assert not m.push("And he said") and m.push(" unto") and m.text == "And he said unto" and m.match == "unto"
    assert m.push(" them") and m.text == "And he said unto"  # later pushes are ignored
    m = StopStringMatcher(["said unto"])  # across increments
    assert not m.push("he sa") and not m.push("id un") and m.push("to them") and m.text == "he said unto"
    m = StopStringMatcher(["abcd", "c", "bc"])  # several in one increment: the earliest end, then the longest
    assert m.push("xabcdef") and m.text == "xabc" and m.match == "bc"
    m = StopStringMatcher(["the"])  # inside a longer word, as vLLM and Hugging Face match
    assert m.push(" them") and m.text == " the"
    m = StopStringMatcher(["zz"])
    assert not any(m.push(t) for t in ("z", "a", "z")) and m.text == "zaz"


def test_stop_strings_are_checked():
    assert check_stop_strings(["a", "b", "a"]) == ("a", "b")
    with pytest.raises(StopStringError, match="empty"):
        StopStringMatcher(["a", ""])
    with pytest.raises(StopStringError, match="strings"):
        check_stop_strings([3])


def test_special_tokens_stop_by_id(kjv):
    tok = kjv.tokenizer
    assert special_stop_ids(tok, ["<|eot|>", "unto", "<|mask|>x"]) == {tok.token_to_id("<|eot|>")}
    assert special_stop_ids(tok, ["unto"]) == frozenset()


def _stream(kjv, stop: list[str], prompt: str = "And he said", mode: str = "ar"):
    """Serve one request through the engine loop and the Triton model's stream assembly (as TritonSink does)."""
    inputs = {"text_input": np.array([prompt.encode()], dtype=object), "mode": np.array([mode.encode()], dtype=object),
              "stop": np.array([s.encode() for s in stop], dtype=object)}
    parsed = parse_request(inputs, kjv, PARAMS)
    out = StreamAssembler(kjv.tokenizer, parsed.stop_strings)
    done = threading.Event()
    box = {}

    class Sink:
        def on_tokens(self, ids):
            return out.push(ids)

        def on_finish(self, result, timing):
            box["result"] = result
            done.set()

        def on_error(self, message, code="INTERNAL"):
            box["error"] = message
            done.set()

        def is_cancelled(self):
            return False

    service = EngineService(kjv)
    try:
        service.submit(parsed.request, Sink())
        assert done.wait(60) and "error" not in box
    finally:
        service.close()
    return out, box["result"]


@pytest.mark.parametrize("mode", ["ar", "spec"])
def test_single_token_stop_string_fires_in_context(kjv, mode):
    """The issue's example: "unto" is one token alone (3639) but " unto" (323) in context."""
    full = kjv.ar_generate(["And he said"], max_new_tokens=40)[0]
    assert " unto" in full.text and kjv.tokenizer.encode("unto") != kjv.tokenizer.encode(" unto")
    out, result = _stream(kjv, ["unto"], mode=mode)
    assert result.finish_reason == "stop" and len(result.token_ids) < 40
    assert out.text.endswith("unto") and out.text == full.text[:full.text.index("unto") + len("unto")]
    assert out.ids == full.token_ids[:len(out.ids)] and kjv.tokenizer.decode(out.ids[-1:]) == " unto"


@pytest.mark.parametrize("stop", [["shall not see"], ["the"], ["xyz", "Son of"]])
def test_other_stop_strings_end_the_output_at_the_match(kjv, stop):
    """Several tokens, a stop inside a longer token (" them"), one of several stop strings."""
    full = kjv.ar_generate(["And he said"], max_new_tokens=40)[0]
    end = min(full.text.index(s) + len(s) for s in stop if s in full.text)
    out, result = _stream(kjv, stop)
    assert result.finish_reason == "stop" and out.text == full.text[:end]
    # the ids end with the token that completed the match
    assert kjv.tokenizer.decode(out.ids).startswith(out.text) and not kjv.tokenizer.decode(out.ids[:-1]) \
        .startswith(out.text)

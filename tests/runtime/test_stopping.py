"""Stop strings are matched on the decoded text (runtime.stopping), whatever tokens spell them; the Triton model's
stream assembly and request parsing use that one implementation."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from trimode.runtime.api import TriModeLM
from trimode.runtime.serving.engine_service import EngineService
from trimode.runtime.serving.triton_request import parse_parameters, parse_request
from trimode.runtime.stopping import (OutputAssembler, StopStringError, StopStringMatcher, check_stop_strings,
                                      special_stop_ids)

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
    out = OutputAssembler(kjv.tokenizer, parsed.stop_strings)
    done = threading.Event()
    box = {}

    class Sink:
        def on_tokens(self, ids):
            return out.verdict(ids)  # as the servers' sinks answer

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
    assert out.stop_string == "unto" and out.text == full.text[:full.text.index("unto")]  # never emitted
    assert out.ids == full.token_ids[:len(out.ids)] and kjv.tokenizer.decode(out.ids[-1:]) == " unto"
    assert result.token_ids == out.ids  # the result (and its counters) hold exactly the tokens sent


@pytest.mark.parametrize("stop", [["shall not see"], ["the"], ["xyz", "Son of"]])
def test_other_stop_strings_end_the_output_at_the_match(kjv, stop):
    """Several tokens, a stop inside a longer token (" them"), one of several stop strings."""
    full = kjv.ar_generate(["And he said"], max_new_tokens=40)[0]
    _, _, first = min((full.text.index(s) + len(s), -len(s), s) for s in stop if s in full.text)
    out, result = _stream(kjv, stop)
    assert result.finish_reason == "stop" and out.stop_string == first
    assert out.text == full.text[:full.text.index(first)]  # cut before the match
    # the ids end with the token that completed the match
    matched = out.text + first
    assert kjv.tokenizer.decode(out.ids).startswith(matched) and not kjv.tokenizer.decode(out.ids[:-1]) \
        .startswith(matched)


# ---- the Python API and the CLI -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_api_stop_strings_end_the_output_before_the_match(kjv, mode):
    """``stop=`` in every entry point: the text ends before the first match, the ids with the token that completed
    it, the callback sees no token after it, and a request without stop strings in the same batch is untouched."""
    entry = {"ar": kjv.ar_generate, "diffusion": kjv.generate, "spec": kjv.linear_spec_generate}[mode]
    prompts = ["And he said", "In the beginning"]
    free = entry(prompts, max_new_tokens=40)
    stop = free[0].text[14:22]  # eight characters from the middle of the output, whatever tokens spell them
    assert stop.strip()
    requests = [kjv.request(prompts[0], 40, free_mode(kjv, mode), stop=[stop]),
                kjv.request(prompts[1], 40, free_mode(kjv, mode))]
    seen: dict[int, list[int]] = {}
    out = kjv.run(requests, on_tokens=lambda rid, ids: seen.setdefault(rid, []).extend(ids))
    cut = free[0].text.index(stop)
    assert out[0].finish_reason == "stop" and out[0].text == free[0].text[:cut]
    ids = out[0].token_ids
    assert ids == free[0].token_ids[:len(ids)] and seen[out[0].request_id] == ids
    assert kjv.tokenizer.decode(ids).startswith(free[0].text[:cut] + stop)
    assert not kjv.tokenizer.decode(ids[:-1]).startswith(free[0].text[:cut] + stop)
    assert out[1].token_ids == free[1].token_ids and out[1].text == free[1].text  # its neighbour is untouched
    assert kjv.cache.stats().num_free_pages == kjv.cache.num_pages  # every page is back


def free_mode(lm, mode: str):
    from trimode.runtime.request import mode_config

    return mode_config(mode, lm.default_block_length)


def test_api_rejects_bad_stop_strings(kjv):
    with pytest.raises(StopStringError, match="empty"):
        kjv.ar_generate("And", max_new_tokens=4, stop=[""])
    with pytest.raises(StopStringError, match="strings"):
        kjv.ar_generate("And", max_new_tokens=4, stop=[3])
    assert kjv.ar_generate("And", max_new_tokens=4, stop="zzzz")[0].finish_reason == "length"  # one string


def test_cli_stop_prints_up_to_the_match(kjv, capsys):
    from trimode.runtime.cli import main

    free = kjv.ar_generate("And he said", max_new_tokens=40)[0].text
    assert main(["generate", "--model", str(MODEL), "--mode", "ar", "--max-new-tokens", "40", "--stop", "Son of",
                 "--stop", "zzz", "And he said"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(free[:free.index("Son of")] + "\n[ar] ")


def test_api_callback_can_stop_a_request_with_stop_strings(kjv):
    """A caller's callback that returns False ends the request, with stop strings set or not; one that returns k
    keeps k of the tokens it was given."""
    for stop in ((), ("zzzz",)):
        out = kjv.run([kjv.request("And he said", 30, free_mode(kjv, "ar"), stop=stop)],
                      on_tokens=lambda rid, ids: False)[0]
        assert out.finish_reason == "stop" and len(out.token_ids) == 1, stop
    seen = []
    out = kjv.run([kjv.request("And he said", 30, free_mode(kjv, "spec"))],
                  on_tokens=lambda rid, ids: seen.extend(ids) or (0 if len(seen) >= 5 else None))[0]
    assert out.finish_reason == "stop" and out.token_ids == seen[:len(out.token_ids)] and len(out.token_ids) < 30

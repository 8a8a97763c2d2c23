"""The instruct interface: conversations rendered with the checkpoint's chat template in the Python API, the CLI
and the Triton model's ``messages`` input; the thinking budget through each front end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import make_lm
from trimode.runtime.api import TriModeLM
from trimode.runtime.cli import main
from trimode.runtime.model.chat_template import ChatTemplateError
from trimode.runtime.request import RequestError, mode_config
from trimode.runtime.serving.triton_request import parse_parameters, parse_request

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-kjv"
PARAMS = parse_parameters({"default_max_tokens": "16", "default_mode": "ar"})
CHAT = [{"role": "system", "content": "The book of Ruth"}, {"role": "user", "content": "And he said unto them"}]


@pytest.fixture(scope="module")
def kjv() -> TriModeLM:
    return TriModeLM.from_pretrained(MODEL, num_pages=64)


def test_messages_are_rendered_with_the_checkpoint_template(kjv):
    text = kjv.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    ids = kjv.tokenizer.encode(text)  # the template writes any special tokens itself
    assert text == "The book of Ruth\nAnd he said unto them\n" and kjv.apply_chat_template(CHAT) == tuple(ids)
    by_messages = kjv.ar_generate(messages=CHAT, max_new_tokens=12)[0]
    by_ids = kjv.ar_generate(list(ids), max_new_tokens=12)[0]
    assert by_messages.prompt_ids == list(ids) and by_messages.token_ids == by_ids.token_ids
    # a list of conversations, and a conversation given as the prompt itself
    two = kjv.linear_spec_generate([CHAT, CHAT[1:]], max_new_tokens=8)
    assert two[0].prompt_ids == list(ids) and two[1].prompt_ids == list(kjv.apply_chat_template(CHAT[1:]))
    with pytest.raises(RequestError, match="not both"):
        kjv.ar_generate("x", messages=CHAT)


def test_messages_without_a_template_or_malformed_are_refused(ckpt, kjv):
    lm = make_lm(ckpt)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        lm.ar_generate(messages=[{"role": "user", "content": "w5"}], max_new_tokens=2)
    with pytest.raises(ChatTemplateError, match=r"messages\[1\]"):
        kjv.ar_generate(messages=[{"role": "user", "content": "a"}, {"content": "b"}], max_new_tokens=2)


def test_thinking_budget_needs_an_end_token(ckpt):
    lm = make_lm(ckpt)
    assert lm.end_think_token_id is None  # no </think> in this tokenizer, none in config.json
    with pytest.raises(RequestError, match="end_think_token_id"):
        lm.ar_generate([5, 6], max_new_tokens=4, max_thinking_tokens=2)
    with pytest.raises(RequestError, match="max_thinking_tokens must be an integer >= 0"):
        lm.ar_generate([5, 6], max_new_tokens=4, max_thinking_tokens=-1, end_think_token_id=7)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        lm.ar_generate([5, 6], max_new_tokens=4, max_thinking_tokens=1, end_think_token_id=10**6)


def test_end_think_token_comes_from_config_then_tokenizer(tmp_path, kjv):
    model = tmp_path / "kjv"
    shutil.copytree(MODEL, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "end_think_token_id": 42}))
    lm = TriModeLM.from_pretrained(model, num_pages=16)
    assert lm.end_think_token_id == 42
    out = lm.ar_generate("And he said", max_new_tokens=8, max_thinking_tokens=3)[0]
    assert out.token_ids[3] == 42 and 42 not in out.token_ids[:3]


def test_cli_chat_stop_and_thinking_budget(kjv, capsys):
    free = kjv.ar_generate(messages=CHAT, max_new_tokens=20)[0]
    args = ["generate", "--model", str(MODEL), "--mode", "spec", "--max-new-tokens", "20", "--chat", "--system",
            CHAT[0]["content"], CHAT[1]["content"], "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"] == free.text
    eot = kjv.tokenizer.token_to_id("<|eot|>")  # as end-of-thinking: it also ends the output, at the budget
    assert main(args + ["--max-thinking-tokens", "5", "--end-think-token-id", str(eot)]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["num_tokens"] == 6 and data["finish_reason"] == "stop"


def test_triton_messages_and_thinking_inputs(kjv):
    def s(text: str):
        return np.array([text.encode()], dtype=object)

    p = parse_request({"messages": s(json.dumps(CHAT)), "max_thinking_tokens": np.array([2], dtype=np.int32),
                       "end_think_token_id": np.array([7], dtype=np.int32)}, kjv, PARAMS)
    assert p.request.prompt_ids == kjv.apply_chat_template(CHAT)
    assert p.request.max_thinking_tokens == 2 and p.request.end_think_token_id == 7
    result = kjv.run([p.request])[0]
    assert result.token_ids[2] == 7 and result.token_ids[:2] == \
        kjv.run([kjv.request(list(p.request.prompt_ids), 2, mode_config("ar", 8))])[0].token_ids
    for inputs, words in [({"messages": s("[{")}, ["messages", "JSON"]),
                          ({"messages": s("{}")}, ["messages", "list"]),
                          ({"messages": s('[{"content": "x"}]')}, ["messages[0]", "role"]),
                          ({"messages": s(json.dumps(CHAT)), "text_input": s("x")}, ["text_input", "messages"]),
                          ({"text_input": s("x"), "max_thinking_tokens": np.array([-2], dtype=np.int32),
                            "end_think_token_id": np.array([7], dtype=np.int32)}, ["max_thinking_tokens"]),
                          ({"text_input": s("x"), "max_thinking_tokens": np.array([2], dtype=np.int32),
                            "end_think_token_id": np.array([99999], dtype=np.int32)}, ["end_think_token_id"])]:
        with pytest.raises(ValueError) as e:
            parse_request(inputs, kjv, PARAMS)
        for word in words:
            assert word in str(e.value), str(e.value)

"""Chat templates render exactly as ``transformers``' ``apply_chat_template(..., tokenize=False)`` renders them
for the same tokenizer directory (the oracle), for templates modeled on public ones (Mistral, Qwen3 / ChatML
with tools and thinking, Llama 3, one with ``{% generation %}``); templates are found where transformers 5.x
finds them; bad messages, missing and broken templates fail with a ``ChatTemplateError`` that says what."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from trimode.runtime.model.chat_template import ChatTemplateError, render_chat_template
from trimode.runtime.model.tokenizer import Tokenizer, word_level_tokenizer

SHIPPED = Path(__file__).resolve().parents[3] / "models" / "tiny-kjv"

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{ bos_token }}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {% if loop.first and system_message is defined %}
[INST] {{ system_message + '\\n\\n' + message['content'] }} [/INST]
        {% else %}
[INST] {{ message['content'] }} [/INST]
        {% endif %}
    {% elif message['role'] == 'assistant' %}
{{ message['content'] + eos_token }}
    {% else %}
        {{ raise_exception('Only user and assistant roles are supported!') }}
    {% endif %}
{% endfor %}
"""

QWEN3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson(sort_keys=True) }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}{{- raise_exception('The system message must come first.') }}{%- endif %}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if message.reasoning_content is defined and message.reasoning_content %}
            {{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
        {%- endif %}
        {%- if message.content is defined %}{{- message.content }}{%- endif %}
        {%- for call in message.tool_calls | default([]) %}
            {{- '\\n<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' }}
            {{- call.function.arguments | tojson(separators=(',', ':')) + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- set ns = namespace(system='') %}
{%- for message in messages if message.role == 'system' %}
    {%- set ns.system = message.content | trim %}
{%- endfor %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: ' + date_string + '\\n\\n' + ns.system + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% continue %}{% endif %}
    {%- if loop.index > 40 %}{% break %}{% endif %}
    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}
    {%- if message.content is string %}
        {{- message.content | trim }}
    {%- else %}
        {%- for part in message.content if part.type == 'text' %}{{- part.text | trim }}{%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

GENERATION = """{% for message in messages %}
{{ message.role }}: {% if message.role == 'assistant' %}{% generation %}{{ message.content }}{{ eos_token }}{% endgeneration %}{% else %}{{ message.content }}{% endif %}

{% endfor %}
{% if add_generation_prompt %}assistant: {% endif %}"""

SPECIAL = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<|mask|>", 4: "<|im_start|>", 5: "<|im_end|>"}

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Who begat Enos?"},
        {"role": "assistant", "content": "Seth."},
        {"role": "user", "content": "  And Enos begat?\n"}]

TOOLS = [{"type": "function", "function": {
    "name": "find_verse", "description": "Find a verse <b>by</b> reference & book: «Genèse»",
    "parameters": {"type": "object", "properties": {"book": {"type": "string"}, "chapter": {"type": "integer"}},
                   "required": ["book"]}}}]

TOOL_CHAT = [{"role": "system", "content": "Use tools."},
             {"role": "user", "content": "Genesis 1:1?"},
             {"role": "assistant", "content": None, "reasoning": "I should look it up.\n",
              "tool_calls": [{"type": "function", "function": {"name": "find_verse",
                                                                "arguments": {"book": "Genèse", "chapter": 1}}}]},
             {"role": "tool", "content": "In the beginning God created the heaven and the earth."},
             {"role": "assistant", "content": "In the beginning...", "reasoning_content": "Quote it."},
             {"role": "user", "content": "Thanks"}]


def _tokenizer_dir(path: Path, chat_template=None, **config) -> Path:
    """A tokenizer directory as a checkpoint has it: tokenizer.json, tokenizer_config.json (with ``config`` and
    ``chat_template`` in it when given)."""
    path.mkdir(parents=True, exist_ok=True)
    word_level_tokenizer(64, SPECIAL).save(path)
    data = json.loads((path / "tokenizer_config.json").read_text())
    data.update(config)
    if chat_template is not None:
        data["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(data, indent=2))
    return path


def _oracle(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _assert_same(path: Path, messages, **kwargs) -> str:
    """Ours and transformers' rendering of ``messages`` for the tokenizer directory ``path``, for both values of
    ``add_generation_prompt``; returns ours with the generation prompt."""
    ours, theirs = Tokenizer.from_dir(path), _oracle(path)
    for add in (True, False):
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add, **kwargs)
        got = ours.apply_chat_template(messages, add_generation_prompt=add, **kwargs)
        assert got == expected, f"add_generation_prompt={add}:\nours:   {got!r}\ntheirs: {expected!r}"
    return ours.apply_chat_template(messages, **kwargs)


def test_mistral_system_merged_into_first_user_turn(tmp_path):
    path = _tokenizer_dir(tmp_path, MISTRAL, bos_token="<s>")
    text = _assert_same(path, CHAT)
    assert text.startswith("<s>") and "[INST] You are terse.\n\nWho begat Enos? [/INST]" in text
    assert "Seth.</s>" in text
    _assert_same(path, CHAT[1:])  # no system message


@pytest.mark.parametrize("messages,message", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "Conversation roles must alternate user/assistant/user/assistant/..."),
    ([{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}],
     "Only user and assistant roles are supported!"),
])
def test_raise_exception_surfaces_as_chat_template_error(tmp_path, messages, message):
    path = _tokenizer_dir(tmp_path, MISTRAL, bos_token="<s>")
    with pytest.raises(Exception, match="alternate|supported") as theirs:
        _oracle(path).apply_chat_template(messages, tokenize=False)
    with pytest.raises(ChatTemplateError) as ours:
        Tokenizer.from_dir(path).apply_chat_template(messages)
    assert str(ours.value) == message == str(theirs.value)


@pytest.mark.parametrize("enable_thinking", [True, False, None])
def test_qwen3_tools_thinking(tmp_path, enable_thinking):
    path = _tokenizer_dir(tmp_path, QWEN3, pad_token="<|im_end|>")
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = _assert_same(path, TOOL_CHAT, tools=TOOLS, **kwargs)
    assert ("<think>\n\n</think>" in text) == (enable_thinking is False)
    assert '"description": "Find a verse <b>by</b> reference & book: «Genèse»"' in text  # no HTML/ASCII escapes
    assert '"arguments": {"book":"Genèse","chapter":1}}' in text
    assert "<think>\nI should look it up.\n</think>" in text  # `reasoning` aliased to reasoning_content
    _assert_same(path, CHAT, **kwargs)  # no tools: the system message on its own


def test_llama3_bos_date_and_loop_controls(tmp_path):
    path = _tokenizer_dir(tmp_path, LLAMA3, bos_token="<|begin_of_text|>")
    parts = [{"role": "user", "content": [{"type": "text", "text": " Read "}, {"type": "image"},
                                          {"type": "text", "text": "this "}]}]
    text = _assert_same(path, CHAT + parts, date_string="26 Jul 2024")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: 26 Jul 2024")
    assert text.endswith("<|start_header_id|>user<|end_header_id|>\n\nReadthis<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")
    long_chat = [{"role": ("user", "assistant")[i % 2], "content": f"m{i}"} for i in range(45)]
    _assert_same(path, long_chat, date_string="1 Jan 2025")  # `break` after 40


def test_strftime_now(tmp_path):
    before = datetime.now().strftime("%Y-%m")
    text = render_chat_template("{{ strftime_now('%Y-%m') }}", [{"role": "user", "content": "x"}])
    assert text in {before, datetime.now().strftime("%Y-%m")}


def test_generation_block(tmp_path):
    path = _tokenizer_dir(tmp_path, GENERATION)
    text = _assert_same(path, CHAT)
    assert "assistant: Seth.</s>\n" in text and text.endswith("assistant: ")


@pytest.mark.parametrize("template", [
    "{% set d = dict(b=2, a=1) %}{{ d | tojson(indent=2, sort_keys=True) }}|{{ dict.fromkeys(['x'], 0) | tojson }}",
    ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + m.content | length %}{% endfor %}"
     "{{ ns.n }}{{ messages[0].content | tojson }}"),
    "{{ messages | length }}{{ foo }}{{ bos_token }}|{{ unk_token }}|{{ image_token }}",
])
def test_globals_and_filters_match(tmp_path, template):
    path = _tokenizer_dir(tmp_path, template, image_token="<img>")
    _assert_same(path, CHAT)


def test_messages_are_cleaned_as_transformers_cleans_them(tmp_path):
    template = ("{% for m in messages %}{{ m.role }}:{{ m.content is defined }}:{{ m.name is defined }}:"
                "{{ m.thinking | default('-') }}:{{ m.reasoning_content | default('-') }}\n{% endfor %}")
    path = _tokenizer_dir(tmp_path, template)
    messages = [{"role": "user", "content": "hi", "name": None},
                {"role": "assistant", "content": None, "thinking": "hmm", "tool_calls": [{"id": "1"}]}]
    snapshot = json.dumps(messages)
    _assert_same(path, messages)
    assert json.dumps(messages) == snapshot  # the caller's messages are not modified


@pytest.mark.parametrize("messages,match", [
    ([], r"non-empty list"),
    ("hello", r"non-empty list of dicts, got str"),
    ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"content": "c"}],
     r"messages\[2\] has no 'role'"),
    ([{"role": None, "content": "a"}], r"messages\[0\]\['role'\] must be a str"),
    ([{"role": "user"}], r"messages\[0\] has no 'content'"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\] must be a str, a list of content parts or None"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}], r"messages\[0\]\['content'\]\[1\]"),
])
def test_malformed_messages(messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        render_chat_template(QWEN3, messages)


@pytest.mark.parametrize("template,match", [
    ("{% for m in messages %}{{ m.content }}", r"syntax error at line 1: .*endfor"),
    ("hi\n{% if %}{% endif %}", r"syntax error at line 2"),
    ("{{ foo.bar }}", r"chat template failed: 'foo' is undefined"),
    ("{{ messages.append(1) }}", r"chat template failed: .*unsafe|chat template failed: .*access"),
    ("{% set ns = namespace() %}{% set ns._x = 1 %}", r"chat template failed: .*underscore attribute '_x'"),
    ("{{ messages[0].content + 1 }}", r"chat template failed: TypeError"),
    ("{{ raise_exception('no tools here') }}", r"^no tools here$"),
])
def test_broken_templates(template, match):
    with pytest.raises(ChatTemplateError, match=match):
        render_chat_template(template, [{"role": "user", "content": "a"}])


def test_bad_tools_and_documents():
    with pytest.raises(ChatTemplateError, match=r"tools\[0\] must be a dict"):
        render_chat_template(QWEN3, CHAT, tools=[len])
    with pytest.raises(ChatTemplateError, match="documents must be a list"):
        render_chat_template(QWEN3, CHAT, documents="doc")


def test_no_chat_template(tmp_path):
    tok = Tokenizer.from_dir(_tokenizer_dir(tmp_path))
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="has no chat template .*pass a prompt instead of messages"):
        tok.apply_chat_template(CHAT)


def test_jinja_file_wins_and_named_templates(tmp_path):
    named = [{"name": "default", "template": "D{{ messages | length }}"},
             {"name": "tool_use", "template": "T{{ tools | length }}"}]
    path = _tokenizer_dir(tmp_path / "list", named)
    tok = Tokenizer.from_dir(path)
    assert tok.chat_template == "D{{ messages | length }}" and tok.chat_templates["tool_use"].startswith("T")
    assert _assert_same(path, CHAT) == "D4"
    assert _assert_same(path, CHAT, tools=TOOLS) == "T1"  # tools pick "tool_use", as in transformers

    (path / "chat_template.jinja").write_text("J{{ messages[-1].content }}\n")
    assert Tokenizer.from_dir(path).chat_template == "J{{ messages[-1].content }}\n"
    _assert_same(path, CHAT)

    no_default = _tokenizer_dir(tmp_path / "no-default", [{"name": "tool_use", "template": "T"}])
    with pytest.raises(ChatTemplateError, match=r"only named ones: \['tool_use'\]"):
        Tokenizer.from_dir(no_default).apply_chat_template(CHAT)


def test_added_token_dicts_and_save_roundtrip(tmp_path):
    bos = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False, "special": True}
    path = _tokenizer_dir(tmp_path / "a", MISTRAL, bos_token=bos, eos_token={**bos, "content": "</s>"})
    tok = Tokenizer.from_dir(path)
    assert tok.eos_token == "</s>" and tok.special_tokens["bos_token"] == "<s>"
    expected = _assert_same(path, CHAT)

    out = tmp_path / "b"
    out.mkdir()
    tok.save(out)
    assert (out / "chat_template.jinja").read_text() == MISTRAL
    assert Tokenizer.from_dir(out).apply_chat_template(CHAT) == expected
    assert _assert_same(out, CHAT) == expected


def test_positional_constructor_unchanged():
    tok = word_level_tokenizer(16, {0: "<unk>", 1: "</s>", 2: "<|mask|>"})
    again = Tokenizer(tok.backend, tok.eos_token, tok.mask_token)
    assert (again.eos_token, again.mask_token, again.chat_template) == ("</s>", "<|mask|>", None)
    assert again.special_tokens == {"eos_token": "</s>", "mask_token": "<|mask|>"}


def test_shipped_model_renders_and_encodes(tmp_path):
    tok = Tokenizer.from_dir(SHIPPED)
    assert tok.chat_template is not None
    messages = [{"role": "system", "content": "The first book of Moses, called Genesis."},
                {"role": "user", "content": "In the beginning God created the heaven and the earth. "},
                {"role": "assistant", "content": [{"type": "text", "text": "And the earth was without form"}]},
                {"role": "assistant", "content": None, "tool_calls": []},
                {"role": "user", "content": "And God said, Let there be light: ü"}]
    text = tok.apply_chat_template(messages)
    assert text == ("The first book of Moses, called Genesis.\nIn the beginning God created the heaven and the "
                    "earth.\nAnd the earth was without form\nAnd God said, Let there be light: ü\n")
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == text[:-1]
    ids = tok.encode(text)
    assert ids and max(ids) < tok.vocab_size and tok.decode(ids) == text  # byte-level BPE: nothing unknown
    # transformers renders the same (tokenizer files only: config.json names a model class it does not know)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED / name, tmp_path / name)
    _assert_same(tmp_path, messages)

"""Chat templates: a checkpoint's Jinja template turned into a prompt string, as ``transformers`` renders it.

Source of the behaviour: ``transformers`` 5.x, ``PreTrainedTokenizerBase.apply_chat_template(...,
tokenize=False)`` and ``utils/chat_template_utils.py`` (``render_jinja_template``,
``_compile_jinja_template``). Templates come from checkpoints, i.e. they are untrusted code, so they run in
Jinja's ``ImmutableSandboxedEnvironment`` with the same options, globals and filters as there:
``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` block (its body is
rendered as is), ``raise_exception``, ``strftime_now``, a ``tojson`` filter that does not escape HTML, and
``dict`` / ``namespace`` that refuse underscore names. The template sees ``messages``, ``tools``,
``documents``, ``add_generation_prompt``, the tokenizer's special tokens and any extra keyword
(``enable_thinking`` ...); messages are cleaned as ``transformers`` cleans them (keys whose value is None
dropped, values rebuilt from plain JSON types, reasoning copied to ``reasoning_content`` / ``thinking``).

Not supported: ``continue_final_message``, tools given as Python functions (pass JSON schemas), batches of
conversations, the assistant-token mask."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "render_chat_template", "validate_messages"]

# Older Jinja releases have known sandbox escapes; transformers refuses them for the same reason.
_MIN_JINJA = (3, 1, 6)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the first is the one templates read


class ChatTemplateError(ValueError):
    """Messages a chat template cannot render, a template that does not compile, or one that fails (its own
    ``raise_exception`` message, an undefined variable, ...)."""


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """``raise_exception(message)`` called by a template: its message is the whole error."""


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant text for training masks; renders its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateDict:
    """The template's ``dict``: builds dicts, but exposes nothing of the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """The template's ``namespace``: refuses underscore-prefixed attributes (no reach into CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: ``self`` may be a key
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set underscore attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Unlike Jinja's own filter: no HTML escaping, non-ASCII kept, json.dumps' layout options exposed
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < _MIN_JINJA:
        raise ChatTemplateError(f"chat templates need jinja2>={'.'.join(map(str, _MIN_JINJA))} (sandbox fixes); "
                                f"this is {jinja2.__version__}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from None


def validate_messages(messages: Any) -> None:
    """Check the shape of a conversation: a non-empty list of dicts, each with a str ``role`` and a ``content``
    that is a str, a list of content parts (dicts) or None (an assistant turn with only tool calls).

    Raises:
        ChatTemplateError: naming the first bad message by index (``messages[2] has no 'role'``)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError(f"messages must be a non-empty list of dicts, got {_describe(messages)}")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"{where} must be a dict with 'role' and 'content', got {_describe(message)}")
        if "role" not in message:
            raise ChatTemplateError(f"{where} has no 'role'")
        if not isinstance(message["role"], str):
            raise ChatTemplateError(f"{where}['role'] must be a str, got {_describe(message['role'])}")
        if "content" not in message:
            raise ChatTemplateError(f"{where} has no 'content' (None for an assistant turn with only tool calls)")
        content = message["content"]
        if isinstance(content, (list, tuple)):
            for j, part in enumerate(content):
                if not isinstance(part, Mapping):
                    raise ChatTemplateError(f"{where}['content'][{j}] must be a dict (a content part such as "
                                            f"{{'type': 'text', 'text': ...}}), got {_describe(part)}")
        elif content is not None and not isinstance(content, str):
            raise ChatTemplateError(f"{where}['content'] must be a str, a list of content parts or None, "
                                    f"got {_describe(content)}")


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                         special_tokens: Mapping[str, str | None] | None = None, **template_kwargs: Any) -> str:
    """The prompt text ``template`` makes of ``messages``: what ``transformers``'
    ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=..., **template_kwargs)``
    returns for a tokenizer with this template and these special tokens.

    Args:
        template: the Jinja source (``chat_template`` of ``tokenizer_config.json`` / ``chat_template.jinja``).
        messages: the conversation, see ``validate_messages``; not modified.
        add_generation_prompt: end with the header that opens an assistant turn (if the template has one).
            Note: the default is True here, False in ``transformers``.
        special_tokens: ``bos_token``, ``eos_token``, ... as strings (None entries are left out, as
            ``transformers``' ``special_tokens_map`` leaves unset ones out); ``template_kwargs`` win over them.
        template_kwargs: more template variables: ``tools`` (a list of JSON-schema dicts), ``documents``
            (a list of dicts), ``enable_thinking``, ``date_string``, ...

    Returns:
        The rendered text (special tokens in it are plain text; encode it without adding special tokens).

    Raises:
        ChatTemplateError: bad messages / tools / documents, a template syntax error, or a failure while
            rendering (the template's ``raise_exception`` message as is; undefined names and other errors
            prefixed with ``chat template failed``)."""
    validate_messages(messages)
    compiled = _compile(template)
    tools = template_kwargs.pop("tools", None)
    documents = template_kwargs.pop("documents", None)
    for name, value in (("tools", tools), ("documents", documents)):
        if value is None:
            continue
        if not isinstance(value, (list, tuple)):
            raise ChatTemplateError(f"{name} must be a list of dicts, got {_describe(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, Mapping):
                raise ChatTemplateError(f"{name}[{i}] must be a dict (a JSON schema / a document), got "
                                        f"{_describe(item)}")
    variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    variables.update(template_kwargs)
    chat = _alias_reasoning([{k: v for k, v in m.items() if v is not None} for m in _plain(list(messages))])
    try:
        return compiled.render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                               add_generation_prompt=add_generation_prompt, **_plain(variables))
    except _TemplateRaised as e:
        raise ChatTemplateError(e.message) from None
    except jinja2.TemplateError as e:  # undefined names, sandbox refusals, ...
        raise ChatTemplateError(f"chat template failed: {e.message or type(e).__name__}") from None
    except Exception as e:  # noqa: BLE001 - the template's own code failed on the values it was given
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    # As transformers: reasoning under any known name is also passed as reasoning_content and thinking
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        out.append(message if reasoning is None else {"thinking": reasoning, **message,
                                                       "reasoning_content": reasoning})
    return out


def _plain(value: Any) -> Any:
    """``value`` rebuilt from plain JSON types (the sandbox does not know the methods of richer objects);
    anything else becomes a placeholder naming its type, as in ``transformers``' ``_plain_template_data``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    numpy = sys.modules.get("numpy")  # not imported: nothing can be a numpy scalar
    if numpy is not None and isinstance(value, numpy.generic):
        return _plain(value.item())  # np.bool_(False) must stay falsy, not become a placeholder string
    return f"<{type(value).__name__}>"


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"

"""The OpenAI protocol spoken by ``runtime/serving/openai_server.py``: request bodies (pydantic models), the checks
of standard fields this server does not implement, the error type with OpenAI's error shape and HTTP status, and
the response and stream-chunk bodies. No web framework here; the app is in ``openai_server.py``.

Field names, response shapes and error bodies follow the OpenAI API reference (Completions, Chat Completions,
Models; ``{"error": {"message", "type", "param", "code"}}``). Supported: ``model`` (must be the served name, else
404 ``model_not_found``), ``prompt`` (a string or token ids, one prompt), ``messages`` (text content; rendered with
the checkpoint's chat template), ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop`` (matched on the decoded text; the output ends before the match), ``n`` (1), ``stream``,
``stream_options.include_usage``. Standard fields this server does not implement (``logprobs``, ``tools``,
``response_format``, penalties other than 0, ...) are refused with a 400 naming them unless they hold their neutral
value; unknown fields are refused too. trimode's own fields (the OpenAI client sends them with ``extra_body``):
``mode`` (a ``runtime.request.Mode``: ar, diffusion, spec, fused_spec, auto), ``block_length``, ``threshold``, ``policy``,
``max_steps``, ``use_lora``, ``num_subblocks`` and ``subblock_length`` (fused_spec), ``top_k``, ``ignore_eos`` (as
vLLM's), ``max_thinking_tokens``,
``end_think_token_id``. ``usage`` carries, besides the token counts, ``trimode``: the mode and the request's
counters (forwards by kind, tokens per forward, accepted lengths, queue time, time to first token).

Defaults that differ from OpenAI's: ``temperature`` 0 (greedy, as the Python API and the CLI); ``max_tokens`` 16
for completions (OpenAI's) and, for chat, as many as fit in the model's positions and the KV pool, up to the
server's ``max_tokens_limit``; ``mode``: the server's ``default_mode``.

Status codes: 400 for a bad request (also malformed JSON and wrong types, which FastAPI would answer with 422),
404 for an unknown model, 503 while the queue is full or the server is shutting down, 500 for a failure while
generating.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from trimode.runtime.request import Mode
from trimode.runtime.serving.engine_service import INVALID_ARG, UNAVAILABLE
from trimode.runtime.unmasking import POLICIES

COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI reference's default for /v1/completions


# ---- errors ---------------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape: ``status`` (HTTP), ``message``, ``param`` (the field), ``code``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``; the type follows from the status."""
        kind = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
                503: "service_unavailable"}
        return {"error": {"message": self.message, "type": kind.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


_SERVICE_CODES = {INVALID_ARG: 400, UNAVAILABLE: 503}  # EngineService error codes -> HTTP status (else 500)


def service_error(message: str, service_code: str, name_code: bool = False) -> APIError:
    """An ``EngineService`` error (a sink's ``on_error(message, code)``) as an ``APIError``: 400 for
    ``INVALID_ARG``, 503 for ``UNAVAILABLE``, else 500. ``name_code``: a 503 carries ``code`` ``service_unavailable``
    (the answer to a request that has not started streaming)."""
    code = "service_unavailable" if name_code and service_code == UNAVAILABLE else None
    return APIError(_SERVICE_CODES.get(service_code, 500), message, code=code)


def _param_path(loc: tuple) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``; pydantic's union-branch tags
    (``str``, ``list[int]``, ...) are left out."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("str", "int", "float", "bool", "none") and "[" not in part and "-" not in part:
            out += f".{part}" if out else part
    return out or None


def validation_error(errors: list[dict]) -> APIError:
    """A body's validation errors (pydantic's ``errors()``, as FastAPI's ``RequestValidationError`` holds them;
    FastAPI would answer 422) as a 400 naming the first offending field."""
    err = errors[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    param = _param_path(tuple(err["loc"]))
    if err["type"] == "missing":
        return APIError(400, f"missing required field {param!r}", param)
    if err["type"] == "extra_forbidden":
        return APIError(400, f"unknown field {param!r}: this server does not take it", param)
    if param is None:  # the body itself is not an object
        return APIError(400, f"the request body must be a JSON object: {err['msg']}")
    return APIError(400, f"{param}: {err['msg']}, got {err.get('input')!r}"[:500], param)


_REQUEST_FIELDS = ("mode", "block_length", "threshold", "policy", "max_steps", "num_subblocks", "subblock_length",
                   "temperature", "top_k", "top_p", "seed", "max_thinking_tokens", "end_think_token_id", "max_tokens")


def field_error(message: str, prompt_field: str, max_tokens_field: str) -> APIError:
    """The runtime's ``ValueError`` about a request (``RequestError``, ``SamplingError``, ``ChatTemplateError``, ...)
    as a 400 naming the body field its message is about (else ``prompt_field``); ``max_new_tokens`` is reported
    as ``max_tokens_field``."""
    fields = _REQUEST_FIELDS + (prompt_field,)
    param = next((f for f in fields if message.startswith(f)), None) or \
        next((f for f in fields if f" {f} " in message or f"{f}=" in message), prompt_field)
    if "max_new_tokens" in message:
        param = max_tokens_field
    return APIError(400, message if param in message else f"{param}: {message}", param)


# ---- request bodies ---------------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted and ignored (no obfuscation field is sent)


class GenerationBody(_Body):
    """Fields shared by both endpoints; standard fields this server does not implement are typed ``Any`` and
    checked against ``NEUTRAL`` (their neutral values are accepted)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=1 << 64)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # trimode's own fields (extra_body)
    mode: Literal[tuple(m.value for m in Mode)] | None = None  # type: ignore[valid-type]
    block_length: int | None = Field(None, ge=1)
    threshold: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    policy: Literal[POLICIES] | None = None  # type: ignore[valid-type]
    max_steps: int | None = Field(None, ge=1)
    use_lora: bool | None = None
    num_subblocks: int | None = Field(None, ge=1)     # fused_spec
    subblock_length: int | None = Field(None, ge=1)   # fused_spec
    top_k: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    max_thinking_tokens: int | None = Field(None, ge=0)
    end_think_token_id: int | None = Field(None, ge=0)
    # standard fields accepted only with a neutral value (NEUTRAL), or ignored as harmless (user, metadata, ...)
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    logprobs: Any = None
    user: Any = None

    NEUTRAL: ClassVar[dict] = {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "logprobs": ()}


class CompletionRequest(GenerationBody):
    """``POST /v1/completions`` (OpenAI reference: Completions > Create)."""

    prompt: Any
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    NEUTRAL: ClassVar[dict] = {**GenerationBody.NEUTRAL, "echo": (False,), "best_of": (1,), "suffix": ("",)}


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(GenerationBody):
    """``POST /v1/chat/completions`` (OpenAI reference: Chat Completions > Create)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None

    NEUTRAL: ClassVar[dict] = {
        **GenerationBody.NEUTRAL, "logprobs": (False,), "top_logprobs": (0,), "tools": ([],),
        "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False), "functions": ([],),
        "function_call": ("none", "auto"), "response_format": ({"type": "text"},), "modalities": (["text"],),
        "audio": (), "prediction": (), "reasoning_effort": (), "verbosity": (), "web_search_options": ()}


def _is_neutral(value, allowed: tuple) -> bool:
    """``value`` is one of ``allowed`` (booleans compared by identity: ``false`` is not the number 0)."""
    return any(value is a if isinstance(value, bool) or isinstance(a, bool) else value == a for a in allowed)


def check_neutral(body: GenerationBody) -> None:
    """Refuse a standard field this server does not implement unless it is unset or holds a neutral value.
    Raises ``APIError`` (400) naming the field and its neutral values."""
    for name, allowed in body.NEUTRAL.items():
        value = getattr(body, name)
        if value is not None and not _is_neutral(value, allowed):
            neutral = "".join(f" or {json.dumps(a)}" for a in allowed)
            raise APIError(400, f"{name} is not supported by this server (got {json.dumps(value)[:80]}); leave it "
                                f"unset{neutral}", name)


def check_body(body: GenerationBody, model_name: str) -> None:
    """The checks that need nothing but the body and the served name: ``model`` (404 ``model_not_found``), the
    unimplemented standard fields (``check_neutral``), ``n``, ``stream_options``. Raises ``APIError``."""
    if body.model != model_name:
        raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{model_name}`", "model",
                       "model_not_found")
    check_neutral(body)
    if body.n not in (None, 1):
        raise APIError(400, f"n must be 1 (one choice per request), got {body.n}", "n")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")


def is_token_ids(prompt) -> bool:
    """``prompt`` is a list of integers (booleans are not token ids)."""
    return isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def check_prompt_size(prompt, field: str, max_bytes: int) -> None:
    """Refuse a text prompt (or conversation) of more than ``max_bytes`` UTF-8 bytes before tokenizing it.
    Raises ``APIError`` (400) naming ``field``."""
    if isinstance(prompt, str):
        size = len(prompt.encode("utf-8"))
    elif prompt and isinstance(prompt[0], dict):
        size = sum(len(m["content"].encode("utf-8")) for m in prompt)
    else:
        return
    if size > max_bytes:
        raise APIError(400, f"{field} is {size} bytes; this server takes prompts of at most {max_bytes} bytes", field)


def completion_prompt(prompt) -> str | list[int]:
    """The one prompt of a completions request: a string or token ids (a list of one of them is unwrapped).
    Raises ``APIError`` (400, ``prompt``) for several prompts or an empty / malformed one."""
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or is_token_ids(prompt[0])):
        prompt = prompt[0]
    if isinstance(prompt, str) or (is_token_ids(prompt) and prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_token_ids(p) for p in prompt):
        raise APIError(400, f"prompt holds {len(prompt)} prompts; this server takes one prompt per request",
                       "prompt")
    raise APIError(400, "prompt must be a non-empty string or a non-empty list of token ids (integers)", "prompt")


# ---- response bodies --------------------------------------------------------------------------------------

def model_card(name: str, created: int) -> dict:
    """A ``model`` object (OpenAI reference: Models); ``created`` in Unix seconds."""
    return {"id": name, "object": "model", "created": created, "owned_by": "trimode"}


def usage_body(num_prompt_tokens: int, num_completion_tokens: int, mode: str, counters: dict, timing: dict) -> dict:
    """``usage``: OpenAI's token counts plus ``trimode`` (the mode, the request's counters and timing)."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
            "trimode": {"mode": mode, **counters, **timing}}


@dataclass(frozen=True)
class Completion:
    """One response's identity: ``id`` (``cmpl-...`` / ``chatcmpl-...``), ``created`` (Unix s), the served model
    and the endpoint (``chat``). Builds the whole answer or, when streamed, its chunks (OpenAI reference: the
    completion, chat completion and chat completion chunk objects)."""

    id: str
    created: int
    model: str
    chat: bool
    include_usage: bool = False  # streamed: every chunk has "usage": null, the last one the usage

    @classmethod
    def new(cls, model: str, chat: bool, created: int, include_usage: bool = False) -> Completion:
        """A fresh random ``id`` for one response."""
        return cls(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created, model, chat, include_usage)

    def response(self, text: str, finish_reason: str, usage: dict) -> dict:
        """The non-streamed answer: one choice holding all of ``text``."""
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                   "logprobs": None} if self.chat else
                  {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": usage}

    def _base(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model}

    def chunk(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        """A streamed chunk: ``text`` (chat: None gives an empty delta), ``finish_reason`` on the last one;
        ``role``: chat's first chunk, announcing the assistant."""
        if self.chat:
            delta = ({"role": "assistant", "content": text or ""} if role else
                     {} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return {**self._base(), "choices": [choice], **({"usage": None} if self.include_usage else {})}

    def usage_chunk(self, usage: dict) -> dict:
        """The chunk after the last choice when ``stream_options.include_usage``: no choices, the usage."""
        return {**self._base(), "choices": [], "usage": usage}


def sse(payload: dict | str) -> str:
    """One server-sent event ``data: ...`` (a dict as compact JSON, a string such as ``[DONE]`` as it is)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"

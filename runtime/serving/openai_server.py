"""An OpenAI-compatible HTTP front for one ``TriModeLM``: a FastAPI app over the ``EngineService`` loop (continuous
batching, every mode), served by uvicorn (``trimode serve-openai``, ``runtime/cli/serve_openai.py``).

Routes: ``GET /v1/models`` (the one served model), ``GET /v1/models/{model}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (streaming as server-sent events ``data: {...}`` ending with ``data: [DONE]``, or one
JSON answer), ``GET /health`` (200 while serving, 503 once shutting down), ``GET /stats`` (``EngineService.stats``:
KV pages used / free, requests in flight, totals).

Field names, response shapes and error bodies follow the OpenAI API reference (Completions, Chat Completions,
Models; ``{"error": {"message", "type", "param", "code"}}``). Supported: ``model`` (must be the served name, else
404 ``model_not_found``), ``prompt`` (a string or token ids, one prompt), ``messages`` (text content; rendered with
the checkpoint's chat template), ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop`` (matched on the decoded text; the output ends before the match), ``n`` (1), ``stream``,
``stream_options.include_usage``. Standard fields this server does not implement (``logprobs``, ``tools``,
``response_format``, penalties other than 0, ...) are refused with a 400 naming them unless they hold their neutral
value; unknown fields are refused too. trimode's own fields (the OpenAI client sends them with ``extra_body``):
``mode`` (a ``runtime.request.Mode``: ar, diffusion, spec, ...), ``block_length``, ``threshold``, ``policy``,
``max_steps``, ``use_lora``, ``top_k``, ``ignore_eos`` (as vLLM's), ``max_thinking_tokens``,
``end_think_token_id``. ``usage`` carries, besides the token counts, ``trimode``: the mode and the request's
counters (forwards by kind, tokens per forward, accepted lengths, queue time, time to first token).

Defaults that differ from OpenAI's: ``temperature`` 0 (greedy, as the Python API and the CLI); ``max_tokens`` 16
for completions (OpenAI's) and, for chat, as many as fit in the model's positions and the KV pool, up to the
server's ``max_tokens_limit``; ``mode``: the server's ``default_mode``.

Status codes: 400 for a bad request (also malformed JSON and wrong types, which FastAPI would answer with 422),
404 for an unknown model, 503 while the queue is full or the server is shutting down, 500 for a failure while
generating. One request's error never affects the others. A client that goes away (a closed stream, a dropped
connection) cancels its request: its pages are freed at the next step boundary.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, ClassVar, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from trimode.runtime.request import Mode, mode_config
from trimode.runtime.serving.engine_service import INVALID_ARG, UNAVAILABLE, EngineService, ServiceClosed
from trimode.runtime.serving.triton_request import request_limits
from trimode.runtime.stopping import OutputAssembler, check_stop_strings
from trimode.runtime.unmasking import POLICIES

DISCONNECT_POLL_S = 0.25     # how often a request still waiting for its first (or next) event checks its client
COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI reference's default for /v1/completions


# ---- errors ---------------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape: ``status`` (HTTP), ``message``, ``param`` (the field), ``code``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def body(self) -> dict:
        kind = {400: "invalid_request_error", 404: "invalid_request_error", 503: "service_unavailable"}
        return {"error": {"message": self.message, "type": kind.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


_SERVICE_CODES = {INVALID_ARG: 400, UNAVAILABLE: 503}  # EngineService error codes -> HTTP status (else 500)


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


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's validation error (it would answer 422) as a 400 naming the first offending field."""
    err = exc.errors()[0]
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


# ---- request bodies ---------------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted and ignored (no obfuscation field is sent)


class _Generation(_Body):
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


class CompletionRequest(_Generation):
    """``POST /v1/completions`` (OpenAI reference: Completions > Create)."""

    prompt: Any
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    NEUTRAL: ClassVar[dict] = {**_Generation.NEUTRAL, "echo": (False,), "best_of": (1,), "suffix": ("",)}


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


class ChatCompletionRequest(_Generation):
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
        **_Generation.NEUTRAL, "logprobs": (False,), "top_logprobs": (0,), "tools": ([],),
        "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False), "functions": ([],),
        "function_call": ("none", "auto"), "response_format": ({"type": "text"},), "modalities": (["text"],),
        "audio": (), "prediction": (), "reasoning_effort": (), "verbosity": (), "web_search_options": ()}


def _is_neutral(value, allowed: tuple) -> bool:
    """``value`` is one of ``allowed`` (booleans compared by identity: ``false`` is not the number 0)."""
    return any(value is a if isinstance(value, bool) or isinstance(a, bool) else value == a for a in allowed)


def _check_neutral(body: _Generation) -> None:
    """Refuse a standard field this server does not implement unless it is unset or holds a neutral value."""
    for name, allowed in body.NEUTRAL.items():
        value = getattr(body, name)
        if value is not None and not _is_neutral(value, allowed):
            neutral = "".join(f" or {json.dumps(a)}" for a in allowed)
            raise APIError(400, f"{name} is not supported by this server (got {json.dumps(value)[:80]}); leave it "
                                f"unset{neutral}", name)


# ---- one request's stream of events from the engine loop thread ------------------------------------------------

class QueueSink:
    """An ``EngineService`` sink that hands events to an asyncio queue (``loop.call_soon_threadsafe``): ``("delta",
    text, ids)``, then ``("finish", text, ids, result, timing)`` or ``("error", message, code)``. Text and stop
    strings are assembled on the engine thread (``runtime.stopping.OutputAssembler``), so a matched stop string
    ends the request at that step. ``cancelled`` is set by the HTTP side when the client is gone."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tokenizer, stop_strings: tuple[str, ...]) -> None:
        self.loop, self.queue = loop, asyncio.Queue()
        self.out = OutputAssembler(tokenizer, stop_strings)
        self.cancelled = False
        self.next_check = 0.0  # when the HTTP side next asks whether the client is still there (monotonic s)
        self.num_ids = 0  # output tokens handed out (those after a stop string's match are dropped)

    def _put(self, *item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def on_tokens(self, ids: list[int]) -> bool:
        keep_going = self.out.push(ids)
        text, new_ids = self.out.take()
        if text or new_ids:
            self.num_ids += len(new_ids)
            self._put("delta", text, new_ids)
        return keep_going

    def on_finish(self, result, timing: dict) -> None:
        text, ids = self.out.finish()
        self.num_ids += len(ids)
        self._put("finish", text, ids, result, timing)

    def on_error(self, message: str, code: str) -> None:
        self._put("error", message, code)

    def is_cancelled(self) -> bool:
        return self.cancelled


class _ClientGone(Exception):
    pass


async def _next_event(sink: QueueSink, http_request: Request | None) -> tuple:
    """The sink's next event; checks at most every ``DISCONNECT_POLL_S`` whether the client left (then cancels the
    request and raises ``_ClientGone``). ``http_request`` None: no check (a streaming response, whose disconnect
    cancels the task itself)."""
    while True:
        if http_request is not None and time.monotonic() >= sink.next_check:
            sink.next_check = time.monotonic() + DISCONNECT_POLL_S
            if await http_request.is_disconnected():
                sink.cancelled = True
                raise _ClientGone()
        try:
            return await asyncio.wait_for(sink.queue.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            continue


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


# ---- the app -------------------------------------------------------------------------------------------

class _Server:
    """The routes' shared state: the runtime, the service, the served name and the request limits."""

    def __init__(self, service: EngineService, lm, model_name: str, default_mode: str, max_tokens_limit: int) -> None:
        if default_mode not in [m.value for m in Mode]:
            raise ValueError(f"default_mode must be one of {[m.value for m in Mode]}, got {default_mode!r}")
        if max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {max_tokens_limit}")
        self.service, self.lm, self.model_name = service, lm, model_name
        self.default_mode, self.max_tokens_limit = default_mode, max_tokens_limit
        self.limits = request_limits(lm, {"max_block_length": 0, "max_prompt_bytes": 0})
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "trimode"}

    # -- a request body -> a GenerationRequest
    def prepare(self, body: _Generation, prompt, prompt_field: str, max_tokens: int | None, max_tokens_field: str,
                default_max_tokens: int | None):
        """Check ``body`` and build its ``GenerationRequest`` (stop strings in ``request.stop``); ``APIError``
        names the field that is wrong. ``prompt``: text, token ids or a conversation (``TriModeLM.request``);
        ``max_tokens`` None: ``default_max_tokens``, or (None too) as many as fit (the model's positions, the KV
        pool), in both cases up to the server's limit. Runs off the event loop (it tokenizes)."""
        if body.model != self.model_name:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves "
                                f"`{self.model_name}`", "model", "model_not_found")
        _check_neutral(body)
        if body.n not in (None, 1):
            raise APIError(400, f"n must be 1 (one choice per request), got {body.n}", "n")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise APIError(400, f"{max_tokens_field} {max_tokens} exceeds this server's limit of "
                                f"{self.max_tokens_limit} (--max-tokens-limit)", max_tokens_field)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            stop_strings = check_stop_strings(stop)
        except ValueError as e:
            raise APIError(400, f"stop: {e}", "stop") from None
        if self.lm.tokenizer is None and (stop_strings or not _is_token_ids(prompt)):
            raise APIError(400, "this model has no tokenizer: only token-id prompts (and no stop strings) are "
                                "served", "stop" if stop_strings else prompt_field)
        _check_prompt_size(prompt, prompt_field, self.limits.max_prompt_bytes)
        if body.block_length is not None and body.block_length > self.limits.max_block_length:
            raise APIError(400, f"block_length must be in 1 .. {self.limits.max_block_length}, got "
                                f"{body.block_length}", "block_length")
        if body.end_think_token_id is not None and body.end_think_token_id >= self.lm.config.vocab_size:
            raise APIError(400, f"end_think_token_id must be < the vocabulary size {self.lm.config.vocab_size}, got "
                                f"{body.end_think_token_id}", "end_think_token_id")
        fields = ("mode", "block_length", "threshold", "policy", "max_steps", "temperature", "top_k", "top_p",
                  "seed", "max_thinking_tokens", "end_think_token_id", "max_tokens", prompt_field)
        try:
            mode = mode_config(body.mode or self.default_mode, self.lm.default_block_length, body.block_length,
                               body.threshold, body.policy or "threshold", body.max_steps,
                               use_lora=True if body.use_lora is None else body.use_lora)
            thinking = {k: getattr(body, k) for k in ("max_thinking_tokens", "end_think_token_id")
                        if getattr(body, k) is not None}
            request = self.lm.request(prompt, max_tokens or 1, mode, temperature=body.temperature or 0.0,
                                      top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p,
                                      seed=body.seed, eos_token_ids=() if body.ignore_eos else None,
                                      stop=stop_strings, **thinking)
            if len(request.prompt_ids) > self.limits.max_prompt_tokens:
                raise APIError(400, f"the prompt is {len(request.prompt_ids)} tokens; this server takes prompts of "
                                    f"at most {self.limits.max_prompt_tokens} tokens", prompt_field)
            if max_tokens is None:
                room = self.lm.engine.max_sequence_tokens - len(request.prompt_ids)
                request = replace(request, max_new_tokens=min(default_max_tokens or room, room,
                                                              self.max_tokens_limit))
            self.lm.engine.check_request(request)  # can it ever fit (positions, pool, an engine's limits)?
        except ValueError as e:  # RequestError, SamplingError, ChatTemplateError, ...: the message names the field
            message = str(e)
            param = next((f for f in fields if message.startswith(f) or f" {f} " in message
                          or f"{f}=" in message), prompt_field)
            if "max_new_tokens" in message:
                param = max_tokens_field
            raise APIError(400, message if param in message else f"{param}: {message}", param) from None
        return request

    # -- running one request
    def submit(self, request, loop) -> tuple[QueueSink, int]:
        sink = QueueSink(loop, self.lm.tokenizer, request.stop)
        try:
            handle = self.service.submit(request, sink)
        except ServiceClosed as e:
            self.service.count_rejected()
            raise APIError(503, str(e), code="service_unavailable") from None
        return sink, handle

    def usage(self, request, sink: QueueSink, result, timing: dict, mode: str) -> dict:
        counters = result.counters() if result.request_id >= 0 else {}
        counters.pop("finish_reason", None)
        n_prompt = len(request.prompt_ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": sink.num_ids, "total_tokens": n_prompt + sink.num_ids,
                "trimode": {"mode": mode, **counters, **timing}}

    @staticmethod
    def finish_reason(sink: QueueSink, result) -> str:
        return "stop" if sink.out.stopped else (result.finish_reason or "stop")

    async def respond(self, http_request: Request, body: _Generation, request, chat: bool):
        """Run ``request``; a JSON answer, or (``body.stream``) an SSE stream that starts once the first event is
        there (so that a refusal still gets its HTTP status)."""
        mode = body.mode or self.default_mode
        sink, handle = self.submit(request, asyncio.get_running_loop())
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

        def abandon() -> None:  # the client left (or the server stops): end the request at the next step
            sink.cancelled = True
            self.service.cancel(handle)

        try:
            first = await _next_event(sink, http_request)
        except BaseException:
            abandon()
            raise
        if first[0] == "error":
            raise APIError(_SERVICE_CODES.get(first[2], 500), first[1],
                           code="service_unavailable" if first[2] == UNAVAILABLE else None)
        if not body.stream:
            text, event = "", first
            try:
                while event[0] == "delta":
                    text += event[1]
                    event = await _next_event(sink, http_request)
            finally:
                if event[0] == "delta":
                    abandon()
            if event[0] == "error":
                raise APIError(_SERVICE_CODES.get(event[2], 500), event[1])
            text += event[1]
            _, _, _, result, timing = event
            reason = self.finish_reason(sink, result)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                       "logprobs": None} if chat else
                      {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": self.model_name, "choices": [choice],
                                 "usage": self.usage(request, sink, result, timing, mode)})
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": self.model_name}

        def chunk(text: str | None, reason: str | None, role: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": text or ""} if role else
                         {} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
            return {**base, "choices": [choice], **({"usage": None} if include_usage else {})}

        async def events():
            event, done = first, False
            try:
                if chat:
                    yield _sse(chunk("", None, role=True))
                while event[0] == "delta":
                    if event[1]:
                        yield _sse(chunk(event[1], None))
                    event = await _next_event(sink, None)
                done = True
                if event[0] == "error":
                    yield _sse(APIError(_SERVICE_CODES.get(event[2], 500), event[1]).body)
                else:
                    _, text, _, result, timing = event
                    if text:
                        yield _sse(chunk(text, None))
                    yield _sse(chunk(None if chat else "", self.finish_reason(sink, result)))
                    if include_usage:
                        yield _sse({**base, "choices": [], "usage": self.usage(request, sink, result, timing, mode)})
                yield _sse("[DONE]")
            finally:
                if not done:  # the client closed the stream, or the server is stopping
                    abandon()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _is_token_ids(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def _check_prompt_size(prompt, field: str, max_bytes: int) -> None:
    """Refuse a text prompt (or conversation) of more than ``max_bytes`` UTF-8 bytes before tokenizing it."""
    if isinstance(prompt, str):
        size = len(prompt.encode("utf-8"))
    elif prompt and isinstance(prompt[0], dict):
        size = sum(len(m["content"].encode("utf-8")) for m in prompt)
    else:
        return
    if size > max_bytes:
        raise APIError(400, f"{field} is {size} bytes; this server takes prompts of at most {max_bytes} bytes", field)


def _completion_prompt(prompt) -> str | list[int]:
    """The one prompt of a completions request: a string or token ids (a list of one of them is unwrapped)."""
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_token_ids(prompt[0])):
        prompt = prompt[0]
    if isinstance(prompt, str) or (_is_token_ids(prompt) and prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_ids(p) for p in prompt):
        raise APIError(400, f"prompt holds {len(prompt)} prompts; this server takes one prompt per request",
                       "prompt")
    raise APIError(400, "prompt must be a non-empty string or a non-empty list of token ids (integers)", "prompt")


def create_app(service: EngineService, lm, model_name: str, default_mode: str = "spec",
               max_tokens_limit: int = 4096) -> FastAPI:
    """The ASGI app serving ``lm`` (a ``TriModeLM``) through ``service`` (its ``EngineService``) as ``model_name``.
    ``default_mode``: the mode of requests that name none; ``max_tokens_limit``: the largest ``max_tokens`` a
    request may ask. Closing the app (its lifespan's end) closes the service. Raises ``ValueError`` for a bad
    ``default_mode`` / ``max_tokens_limit``."""
    server = _Server(service, lm, model_name, default_mode, max_tokens_limit)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        service.close(timeout=10)  # anything still in flight ends with "the server is shutting down"

    app = FastAPI(title="trimode", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def on_api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        service.count_rejected()
        error = _validation_error(exc)
        return JSONResponse(error.body, status_code=error.status)

    @app.exception_handler(Exception)
    async def on_internal_error(_request: Request, exc: Exception) -> JSONResponse:
        error = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
        return JSONResponse(error.body, status_code=500)

    async def run(http_request: Request, body: _Generation, prompt, field: str, max_tokens, max_tokens_field: str,
                  default, chat: bool):
        try:
            # tokenizing and rendering the chat template off the event loop: a long prompt stalls no stream
            request = await asyncio.to_thread(server.prepare, body, prompt, field, max_tokens, max_tokens_field,
                                              default)
        except APIError:
            service.count_rejected()
            raise
        try:
            return await server.respond(http_request, body, request, chat)
        except _ClientGone:
            return JSONResponse(APIError(400, "the client closed the connection").body, status_code=400)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = 503 if service.draining else 200
        return JSONResponse({"status": "shutting down" if status == 503 else "ok"}, status_code=status)

    @app.get("/stats")
    async def stats() -> dict:
        return {**service.stats(), "model": model_name, "draining": service.draining}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        if model != model_name:
            raise APIError(404, f"The model `{model}` does not exist", "model", "model_not_found")
        return server.model_card()

    @app.post("/v1/completions")
    async def completions(http_request: Request, body: CompletionRequest):
        try:
            prompt = _completion_prompt(body.prompt) if body.model == model_name else None  # None: prepare's 404
        except APIError:
            service.count_rejected()
            raise
        return await run(http_request, body, prompt, "prompt", body.max_tokens, "max_tokens",
                         COMPLETION_DEFAULT_MAX_TOKENS, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request, body: ChatCompletionRequest):
        conversation = [{"role": m.role, "content": m.text()} for m in body.messages]
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        return await run(http_request, body, conversation, "messages", getattr(body, field), field, None, chat=True)

    return app

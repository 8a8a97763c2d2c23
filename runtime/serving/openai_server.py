"""An OpenAI-compatible HTTP front for one ``TriModeLM``: a FastAPI app over the ``EngineService`` loop (continuous
batching, every mode), served by uvicorn (``trimode serve-openai``, ``runtime/cli/serve_openai.py``).

Routes: ``GET /v1/models`` (the one served model), ``GET /v1/models/{model}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (streaming as server-sent events ``data: {...}`` ending with ``data: [DONE]``, or one
JSON answer), ``GET /health`` (200 while serving, 503 once shutting down), ``GET /stats`` (``EngineService.stats``:
KV pages used / free, requests in flight, totals).

The protocol (supported and refused fields, defaults, response shapes, status codes) is
``runtime/serving/openai_protocol.py``; this module checks a body against the served model's limits, hands the
request to the engine thread and streams its events back (``QueueSink``). One request's error never affects the
others. A client that goes away (a closed stream, a dropped connection) cancels its request: its pages are freed at
the next step boundary.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from trimode.runtime.request import Mode, mode_config
from trimode.runtime.serving.engine_service import EngineService, ServiceClosed
from trimode.runtime.serving.openai_protocol import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    APIError,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    GenerationBody,
    check_body,
    check_prompt_size,
    completion_prompt,
    field_error,
    is_token_ids,
    model_card,
    service_error,
    sse,
    usage_body,
    validation_error,
)
from trimode.runtime.serving.triton_request import request_limits
from trimode.runtime.stopping import OutputAssembler, check_stop_strings

DISCONNECT_POLL_S = 0.25     # how often a request still waiting for its first (or next) event checks its client


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

    def on_tokens(self, ids: list[int]) -> bool | int:
        verdict = self.out.verdict(ids)  # a stop string: the request ends with the tokens kept
        text, new_ids = self.out.take()
        if text or new_ids:
            self.num_ids += len(new_ids)
            self._put("delta", text, new_ids)
        return verdict

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
        return model_card(self.model_name, self.created)

    # -- a request body -> a GenerationRequest
    def prepare(self, body: GenerationBody, prompt, prompt_field: str, max_tokens: int | None, max_tokens_field: str,
                default_max_tokens: int | None):
        """Check ``body`` and build its ``GenerationRequest`` (stop strings in ``request.stop``); ``APIError``
        names the field that is wrong. ``prompt``: text, token ids or a conversation (``TriModeLM.request``);
        ``max_tokens`` None: ``default_max_tokens``, or (None too) as many as fit (the model's positions, the KV
        pool), in both cases up to the server's limit. Runs off the event loop (it tokenizes)."""
        check_body(body, self.model_name)
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise APIError(400, f"{max_tokens_field} {max_tokens} exceeds this server's limit of "
                                f"{self.max_tokens_limit} (--max-tokens-limit)", max_tokens_field)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            stop_strings = check_stop_strings(stop)
        except ValueError as e:
            raise APIError(400, f"stop: {e}", "stop") from None
        if self.lm.tokenizer is None and (stop_strings or not is_token_ids(prompt)):
            raise APIError(400, "this model has no tokenizer: only token-id prompts (and no stop strings) are "
                                "served", "stop" if stop_strings else prompt_field)
        check_prompt_size(prompt, prompt_field, self.limits.max_prompt_bytes)
        if body.block_length is not None and body.block_length > self.limits.max_block_length:
            raise APIError(400, f"block_length must be in 1 .. {self.limits.max_block_length}, got "
                                f"{body.block_length}", "block_length")
        if body.end_think_token_id is not None and body.end_think_token_id >= self.lm.config.vocab_size:
            raise APIError(400, f"end_think_token_id must be < the vocabulary size {self.lm.config.vocab_size}, got "
                                f"{body.end_think_token_id}", "end_think_token_id")
        try:
            mode = mode_config(body.mode or self.default_mode, self.lm.default_block_length, body.block_length,
                               body.threshold, body.policy or "threshold", body.max_steps,
                               use_lora=True if body.use_lora is None else body.use_lora,
                               num_subblocks=body.num_subblocks, subblock_length=body.subblock_length)
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
            raise field_error(str(e), prompt_field, max_tokens_field) from None
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
        return usage_body(len(request.prompt_ids), sink.num_ids, mode, counters, timing)

    @staticmethod
    def finish_reason(sink: QueueSink, result) -> str:
        return "stop" if sink.out.stopped else (result.finish_reason or "stop")

    async def respond(self, http_request: Request, body: GenerationBody, request, chat: bool):
        """Run ``request``; a JSON answer, or (``body.stream``) an SSE stream that starts once the first event is
        there (so that a refusal still gets its HTTP status)."""
        mode = body.mode or self.default_mode
        sink, handle = self.submit(request, asyncio.get_running_loop())
        completion = Completion.new(self.model_name, chat, int(time.time()),
                                    bool(body.stream_options and body.stream_options.include_usage))

        def abandon() -> None:  # the client left (or the server stops): end the request at the next step
            sink.cancelled = True
            self.service.cancel(handle)

        try:
            first = await _next_event(sink, http_request)
        except BaseException:
            abandon()
            raise
        if first[0] == "error":
            raise service_error(first[1], first[2], name_code=True)
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
                raise service_error(event[1], event[2])
            text += event[1]
            _, _, _, result, timing = event
            return JSONResponse(completion.response(text, self.finish_reason(sink, result),
                                                    self.usage(request, sink, result, timing, mode)))

        async def events():
            event, done = first, False
            try:
                if chat:
                    yield sse(completion.chunk("", None, role=True))
                while event[0] == "delta":
                    if event[1]:
                        yield sse(completion.chunk(event[1], None))
                    event = await _next_event(sink, None)
                done = True
                if event[0] == "error":
                    yield sse(service_error(event[1], event[2]).body)
                else:
                    _, text, _, result, timing = event
                    if text:
                        yield sse(completion.chunk(text, None))
                    yield sse(completion.chunk(None if chat else "", self.finish_reason(sink, result)))
                    if completion.include_usage:
                        yield sse(completion.usage_chunk(self.usage(request, sink, result, timing, mode)))
                yield sse("[DONE]")
            finally:
                if not done:  # the client closed the stream, or the server is stopping
                    abandon()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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
        error = validation_error(exc.errors())
        return JSONResponse(error.body, status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # an unknown route (404) or method (405) answered in OpenAI's error shape too
        error = APIError(exc.status_code, f"{exc.detail}: {_request.method} {_request.url.path}")
        return JSONResponse(error.body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_internal_error(_request: Request, exc: Exception) -> JSONResponse:
        error = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
        return JSONResponse(error.body, status_code=500)

    async def run(http_request: Request, body: GenerationBody, prompt, field: str, max_tokens, max_tokens_field: str,
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
            prompt = completion_prompt(body.prompt) if body.model == model_name else None  # None: prepare's 404
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

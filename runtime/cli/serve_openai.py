"""``trimode serve-openai``: an OpenAI-compatible HTTP server (``runtime/serving/openai_server.py``) on uvicorn.

    trimode serve-openai --model DIR  [--port 8000] [--served-model-name NAME] [--default-mode spec] ...
    trimode serve-openai --engine DIR [--executor auto|tensorrt|onnxruntime|torch] ...

Loads the runtime once (a checkpoint, or an engine directory whose executor ``auto`` picks as ``trimode generate
--engine`` does), runs one ``EngineService`` loop and serves ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` on ``--host`` (default 127.0.0.1: only this machine). Prints one JSON line
``{"ready": true, "url": ..., "model": ...}`` once it listens (``--port 0``: a free port, named there). SIGINT /
SIGTERM stop it: new connections are refused, the requests in flight get ``--graceful-timeout`` seconds to finish,
then the service ends what is left with "the server is shutting down" (a stream's last event is that error, a
waiting request gets a 503) and frees its pages; a last JSON line ``{"stopped": {...}}`` gives the signal and
the service's totals, and the exit status is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from trimode.plugins import tensorrt_libs
from trimode.runtime import settings
from trimode.runtime.request import Mode
from trimode.runtime.serving.engine_service import ADMISSION_POLICIES


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--graceful-timeout must be a number of seconds >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"--graceful-timeout must be a number of seconds >= 0, got {text}")
    return value


def add_subparsers(sub) -> None:
    """Register ``serve-openai`` on an ``add_subparsers()`` object; it sets ``handler=run``."""
    p = sub.add_parser("serve-openai", help="serve a checkpoint or an engine directory over an OpenAI-compatible "
                                            "HTTP API (uvicorn, 127.0.0.1 by default)")
    add_source_arguments(p)
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=settings.positive_int("--port", minimum=0), default=8000,
                   help="port (default 8000; 0: a free one, printed in the ready line)")
    settings.add_arguments(p, names=settings.GENERATE_OPTIONS, unset=True)
    p.add_argument("--kv-admission", choices=ADMISSION_POLICIES, default="reserve",
                   help="reserve: admit only what fits in the worst case (default); greedy: admit at once, fail "
                        "the newest request if pages run out")
    p.add_argument("--max-queued-requests", type=settings.positive_int("--max-queued-requests"), default=1024,
                   help="requests waiting to start before new ones get 503 (default 1024)")
    p.add_argument("--default-mode", choices=[m.value for m in Mode], default="spec",
                   help="mode of requests that name none (default spec)")
    p.add_argument("--max-tokens-limit", type=settings.positive_int("--max-tokens-limit"), default=4096,
                   help="largest max_tokens a request may ask (default 4096)")
    p.add_argument("--graceful-timeout", type=_seconds, default=5.0,
                   help="seconds requests in flight get to finish when the server stops (default 5)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info",
                   help="uvicorn's log level (default info)")
    p.set_defaults(handler=run)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` | ``--engine`` (one required) and ``--executor``: what ``load_lm`` reads."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (config.json, safetensors, tokenizer)")
    src.add_argument("--engine", help="engine directory (scripts/build_engine.py --out); its manifest is checked first")
    parser.add_argument("--executor", choices=settings.ENGINE_EXECUTORS, default=None,
                        help="with --engine: the TensorRT plans (tensorrt, CUDA GPU), the reference graphs "
                             "(onnxruntime) or the engine's checkpoint (torch); auto (the default): tensorrt where its "
                             "plans can run here, else onnxruntime. A checkpoint (--model) runs on torch")


def load_lm(args: argparse.Namespace):
    """The ``TriModeLM`` of ``--model`` or ``--engine`` with the runtime settings of ``settings.GENERATE_OPTIONS``
    (executor ``auto``: TensorRT where its plans can run here, else onnxruntime); ``trimode generate`` loads through
    it too. Raises ``CheckpointError`` / ``EngineDirError`` naming the problem (before any choice is printed),
    ``ValueError`` for bad settings (``--executor`` other than torch with ``--model``)."""
    from trimode.runtime.api import TriModeLM
    from trimode.runtime.assembly import choose_engine_executor

    runtime_settings = settings.from_args(args, settings.GENERATE_OPTIONS)
    if args.engine is None:
        if args.executor not in (None, "torch"):
            raise ValueError(f"--executor {args.executor} runs an engine directory (--engine DIR); a checkpoint "
                             f"(--model) runs on torch")
        return TriModeLM.from_pretrained(args.model, settings=runtime_settings)
    from trimode.runtime.executors.engine_dir import check_engine_dir

    check_engine_dir(args.engine, verify_hashes=False)  # a path that is no engine directory: its error, nothing else
    executor = args.executor or "auto"
    if executor in ("auto", "tensorrt"):
        chosen, why = choose_engine_executor(args.engine, need_loader_path=False)
        if chosen == "tensorrt":
            tensorrt_libs.reexec_with_loader_path()  # TensorRT-RTX plugin engines need libtensorrt_rtx.so
            executor = "tensorrt"
        elif executor == "auto":
            executor = "onnxruntime"
            print(f"trimode: --executor auto: onnxruntime ({why})", file=sys.stderr)
    return TriModeLM.from_engine(args.engine, executor=executor, settings=runtime_settings)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT / SIGTERM, then print ``{"stopped": {...}}`` (the signal and the service's totals) as one
    JSON line. Returns 0 after a clean stop, 1 when the server could not start (e.g. the port is taken), 2 when the
    model cannot be loaded or the ``serve`` extra (fastapi, uvicorn) is not installed."""
    try:
        import uvicorn
        from trimode.runtime.serving.openai_server import create_app
    except ImportError as e:
        print(f"trimode: error: serve-openai needs fastapi and uvicorn (pip install 'trimode[serve]'): {e}",
              file=sys.stderr)
        return 2
    from trimode.runtime.executors.engine_dir import EngineDirError
    from trimode.runtime.model.hf_format import CheckpointError
    from trimode.runtime.serving.engine_service import EngineService

    source = args.engine or args.model
    try:
        lm = load_lm(args)
    except (CheckpointError, EngineDirError) as e:
        print(f"trimode: error: {'--engine' if args.engine else '--model'}: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or Path(source).resolve().name
    service = EngineService(lm, max_queued=args.max_queued_requests, admission=args.kv_admission)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:  # announce the bound address (--port 0: the port picked)
            await super().startup(sockets)
            if self.started and self.servers:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(json.dumps({"ready": True, "url": f"http://{host}:{port}/v1", "model": name}), flush=True)

        async def shutdown(self, sockets=None) -> None:
            # requests in flight get --graceful-timeout seconds to finish; then the service ends the rest with "the
            # server is shutting down" (a last error event, or a 503), so that every response is complete before
            # uvicorn's own limit (later) would cancel it mid-way
            async def drain_later() -> None:
                await asyncio.sleep(args.graceful_timeout)
                await asyncio.to_thread(service.drain, 10)

            drain = asyncio.create_task(drain_later())
            try:
                await super().shutdown(sockets)
            finally:
                drain.cancel()

    # uvicorn stops gracefully on SIGINT / SIGTERM, then raises the signal again under the handlers it found:
    # these record it instead of killing the process, so that a clean stop exits with status 0
    signals: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: signals.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        app = create_app(service, lm, name, default_mode=args.default_mode, max_tokens_limit=args.max_tokens_limit)
        server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                       timeout_graceful_shutdown=args.graceful_timeout + 15))
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        service.close(timeout=10)  # the app's lifespan closes it on a normal stop; this covers a failed start
    if not server.started:  # e.g. the port is taken (uvicorn logged why)
        return 1
    stats = service.stats()
    print(json.dumps({"stopped": {"signal": signal.Signals(signals[0]).name if signals else None,
                                  **{k: stats.get(k) for k in ("completed", "cancelled", "errors", "rejected",
                                                               "tokens")}}}), flush=True)
    return 0

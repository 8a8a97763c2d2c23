"""The Triton Inference Server Python-backend model: one ``TriModeLM`` (one KV cache) behind one
``EngineService`` loop, serving decoupled (streaming) requests in any mode with continuous batching. The runtime
is a checkpoint's (``model_dir``) or an engine directory's (``engine_dir``: ``load_engine``, executor ``auto``
being TensorRT where its plans can run in this process, else onnxruntime; the choice is logged and in ``stats``).

A repository written by ``runtime.serving.repository`` holds a ``model.py`` that only re-exports
``TritonPythonModel`` from here, so the serving code is part of the installed package. Each Triton request is
read and checked by ``runtime.serving.triton_request`` (its inputs, their defaults and the ``config.pbtxt``
parameters are listed there) and becomes one engine request; its responses are sent from the engine loop thread
as tokens are accepted (``runtime.stopping.OutputAssembler``: UTF-8 safe text increments, stop strings never emitted; ``TritonSink``: the
decoupled response sender).

Outputs: ``text_output`` (STRING [1]: the text increment, or the whole text when not streaming),
``output_ids`` (INT32 [-1]: the token increment), ``finish_reason`` (STRING [1]: "" until the last response,
then stop | length | cancelled), ``counters`` (STRING [1]: JSON, last response only: forwards by kind, tokens
per forward, accepted lengths, queue time, time to first token, ...). Errors arrive as an error response, which
ends that request, with a Triton error code: ``INVALID_ARG`` for a bad request, ``UNAVAILABLE`` for "server
busy", KV exhaustion and "the server is shutting down" (retry elsewhere or later), ``INTERNAL`` otherwise.
Every refusal is counted in ``rejected`` (stats and the ``trimode_requests_rejected`` metric).

Stopping: the launcher (``runtime.serving.server.TritonServer.stop``) sends ``command="drain TOKEN"`` (TOKEN from
the ``TRIMODE_DRAIN_TOKEN`` environment the launcher gave tritonserver) before it signals the server, so every
stream in flight ends at once with a final "the server is shutting down" error and the server has nothing left
to wait for; ``finalize`` does the same for anything still running. The stats answer carries ``server_pid``
(the tritonserver that runs this backend), by which the launcher proves it talks to its own server.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

try:  # present only inside the Triton Python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported outside Triton (tests of the streaming code)
    pb_utils = None

from trimode.runtime import settings
from trimode.runtime.request import GenerationResult
from trimode.runtime.serving.server import DRAIN_TOKEN_ENV
from trimode.runtime.serving.triton_request import (INPUTS, ParsedRequest, check_request_parameters, parse_parameters,
                                                    parse_request, request_limits)
from trimode.runtime.stopping import OutputAssembler


# ---- streaming one request back ---------------------------------------------------------------------------

def result_counters(result: GenerationResult, timing: dict, mode: str, num_ids: int) -> dict:
    """The ``counters`` JSON of a request's last response: the result's counters (or only its finish reason
    when it never ran), the mode, prompt and output token counts and the service's ``timing`` (seconds)."""
    counters = result.counters() if result.request_id >= 0 else {"finish_reason": result.finish_reason}
    counters.update(mode=mode, prompt_tokens=len(result.prompt_ids), output_tokens=num_ids, **timing)
    return counters


class TritonSink:
    """Sends one request's responses through its decoupled response sender (from the engine loop thread)."""

    def __init__(self, request, sender, parsed: ParsedRequest, tokenizer) -> None:
        self.request, self.sender, self.parsed = request, sender, parsed
        self.out = OutputAssembler(tokenizer, parsed.stop_strings)
        self.broken = False

    def _send(self, text: str, ids: list[int], finish_reason: str, counters: str, final: bool) -> None:
        tensors = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
                   pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int32)),
                   pb_utils.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=np.object_)),
                   pb_utils.Tensor("counters", np.array([counters.encode()], dtype=np.object_))]
        response = pb_utils.InferenceResponse(output_tensors=tensors)
        try:
            if final:
                self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                self.sender.send(response)
        except Exception:
            self.broken = True
            if final:  # the request must still be completed, or the server keeps it (and the model) alive
                _close_quietly(self.sender)
            raise

    def on_tokens(self, ids: list[int]) -> bool | int:
        verdict = self.out.verdict(ids)  # a stop string: the request ends with the tokens kept
        if self.parsed.stream:
            text, new_ids = self.out.take()
            if new_ids:
                self._send(text, new_ids, "", "", final=False)
        return verdict

    def on_finish(self, result: GenerationResult, timing: dict) -> None:
        text, ids = self.out.finish()
        counters = result_counters(result, timing, self.parsed.mode, len(self.out.ids))
        self._send(text, ids, result.finish_reason or "", json.dumps(counters), final=True)

    def on_error(self, message: str, code: str = "INTERNAL") -> None:
        send_error(self.sender, message, code)

    def is_cancelled(self) -> bool:
        if self.broken:
            return True
        return bool(self.request.is_cancelled())  # one IPC round trip to the server


def _log_warn(message: str) -> None:
    try:
        pb_utils.Logger.log_warn(message)
    except Exception:
        print(message, flush=True)


def send_error(sender, message: str, code: str = "INTERNAL") -> None:
    """End a request with an error response carrying ``message`` and the Triton error ``code`` (a
    ``TritonError`` attribute name; closing it quietly if that send fails)."""
    try:
        error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code, pb_utils.TritonError.INTERNAL))
    except TypeError:  # a backend without error codes
        error = pb_utils.TritonError(message)
    try:
        sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception:
        _close_quietly(sender)
        raise


def _close_quietly(sender) -> None:
    try:
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception:
        pass


def request_inputs(request) -> dict:
    """The input tensors a Triton request carries, as ``{name: numpy array}`` (names from ``INPUTS``)."""
    out = {}
    for name in INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            out[name] = tensor.as_numpy()
    return out


def _exit_now() -> None:
    """End this backend process at once (tritonserver is gone), removing its shared-memory region (the stub's
    second argument)."""
    try:
        args = Path("/proc/self/cmdline").read_bytes().split(b"\0")
        region = args[2].decode() if len(args) > 2 else ""
        if region and "/" not in region and (Path("/dev/shm") / region).exists():
            (Path("/dev/shm") / region).unlink()
    except OSError:
        pass
    os._exit(1)


# ---- loading ---------------------------------------------------------------------------------------------

def _log_info(message: str) -> None:
    try:
        pb_utils.Logger.log_info(message)
    except Exception:
        print(message, flush=True)


def engine_settings(params: dict) -> settings.RuntimeSettings:
    """The runtime settings of an engine directory's parsed ``config.pbtxt`` parameters: only those given (not
    0 or empty) are set, so that the engine's build-time limits size the rest (``RuntimeSettings.given``,
    ``runtime.assembly.settings_within``); the executor is ``load_engine``'s."""
    values = {field: params[name] for name, (_, _, field) in settings.TRITON_PARAMETERS.items()
              if name in params and field != "executor"}
    return settings.DEFAULTS.with_(**{k: v for k, v in values.items() if v not in (0, "")})


def load_engine(engine_dir: Path, params: dict):
    """The ``TriModeLM`` of an engine directory under the parsed ``params``: executor ``auto`` is tensorrt where
    its plans can run in this process (TensorRT-RTX plans also need ``libtensorrt_rtx.so`` on the loader path
    this process started with: the launcher puts it there), else onnxruntime; the choice and why is logged once.
    Raises ``EngineDirError`` / ``EngineMismatch`` naming what the runtime refuses."""
    from trimode.runtime.api import TriModeLM
    from trimode.runtime.assembly import choose_engine_executor

    executor, why = params["executor"], ""
    if executor == "auto":
        executor, reason = choose_engine_executor(engine_dir)
        why = f" (executor auto: {reason})"
    lm = TriModeLM.from_engine(engine_dir, executor=executor, settings=engine_settings(params),
                               page_size=params["page_size"] or None)
    _log_info(f"trimode: engine directory {engine_dir}: executor {lm.settings.executor}{why}")
    return lm


# ---- the model ------------------------------------------------------------------------------------------

_METRICS = {
    "trimode_kv_pages_total": ("num_pages", "KV cache pages in the pool"),
    "trimode_kv_pages_used": ("pages_used", "KV cache pages held by sequences"),
    "trimode_kv_pages_reserved": ("pages_reserved", "KV pages reserved for admitted requests' worst case"),
    "trimode_requests_running": ("requests_running", "requests in the running batch"),
    "trimode_requests_waiting": ("requests_waiting", "requests queued for admission"),
    "trimode_requests_in_flight": ("requests_in_flight", "requests accepted and not finished"),
    "trimode_requests_completed": ("completed", "requests finished normally (stop or length)"),
    "trimode_requests_cancelled": ("cancelled", "requests cancelled (client gone)"),
    "trimode_requests_failed": ("errors", "requests failed while running (e.g. KV exhausted)"),
    "trimode_requests_rejected": ("rejected", "requests rejected before running"),
    "trimode_generated_tokens": ("tokens", "tokens generated"),
    "trimode_engine_steps": ("steps", "engine steps (forwards)"),
}


class TritonPythonModel:
    """The Triton Python-backend model: ``initialize`` loads the runtime from the ``config.pbtxt`` parameters
    (a checkpoint, ``model_dir``, or an engine directory, ``engine_dir``: ``load_engine``; ``ValueError`` naming
    a bad one), ``execute`` submits each request to the ``EngineService`` (bad requests
    get an error response), ``finalize`` stops the service and releases tensor-parallel workers."""

    def initialize(self, args: dict) -> None:
        from trimode.runtime.api import TriModeLM
        from trimode.runtime.serving.engine_service import EngineService

        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise ValueError("the trimode model must use the decoupled transaction policy (streaming)")
        raw = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.params = p = parse_parameters(raw)
        if bool(p["model_dir"]) == bool(p["engine_dir"]):
            raise ValueError("config.pbtxt needs exactly one of the parameters model_dir (a checkpoint) and "
                             "engine_dir (an engine directory)")
        model_dir = Path(p["engine_dir"] or p["model_dir"])
        if not model_dir.is_absolute():  # relative to the model's version folder (a self-contained repository)
            model_dir = Path(args["model_repository"]) / args["model_version"] / model_dir
        self.comm, keepalive = None, None
        if p["engine_dir"] and p["tp"] > 1:
            raise ValueError("config.pbtxt: a tensor-parallel model (tp > 1) serves a checkpoint (model_dir), "
                             "not an engine directory")
        if p["tp"] > 1:  # rank 0 of a tensor-parallel group; the workers are `trimode serve --tp N` ranks 1..N-1
            from trimode.runtime.parallel.comm import join_group

            host, _, port = p["tp_master"].rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"config.pbtxt parameter tp_master must be host:port, got {p['tp_master']!r}")
            self.comm = join_group(0, p["tp"], host, int(port), timeout_s=p["tp_timeout"])
            keepalive = p["tp_timeout"] / 4
        if p["engine_dir"]:
            self.lm = load_engine(model_dir, p)
        else:  # rank 0's shard under tensor parallelism, else the whole checkpoint
            self.lm = TriModeLM.from_pretrained(model_dir, comm=self.comm, settings=settings.from_parameters(p))
        self.limits = request_limits(self.lm, p)
        self.model_name = args.get("model_name", "trimode")
        self.instance_name = args.get("model_instance_name", self.model_name)
        self._metrics = self._make_metrics()
        self._last_metrics = 0.0
        self.service = EngineService(self.lm, max_queued=p["max_queued_requests"], admission=p["kv_admission"],
                                     cancel_poll_s=p["cancel_poll_ms"] / 1000.0, on_stats=self._on_stats,
                                     keepalive_s=keepalive)
        threading.Thread(target=self._watch, args=(os.getppid(),), name="trimode-watch", daemon=True).start()

    def _make_metrics(self) -> dict:
        try:
            metrics = {}
            self._metric_families = []  # a family must outlive its metrics
            for name, (key, help_text) in _METRICS.items():
                family = pb_utils.MetricFamily(name=name, description=help_text, kind=pb_utils.MetricFamily.GAUGE)
                self._metric_families.append(family)
                metrics[key] = family.Metric(labels={"model": self.model_name, "instance": self.instance_name})
            return metrics
        except Exception as e:  # metrics disabled on this server: the stats command still works
            _log_warn(f"trimode: custom metrics unavailable ({type(e).__name__}: {e}); the stats command still works")
            return {}

    def _on_stats(self, stats: dict) -> None:
        now = time.perf_counter()
        if not self._metrics or (now - self._last_metrics < 0.05 and stats["requests_in_flight"]):
            return
        self._last_metrics = now
        for key, metric in self._metrics.items():
            metric.set(float(stats[key]))

    def execute(self, requests) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._execute_one(request, sender)
            except Exception as e:  # never let one request take the model down
                self._refuse(sender, f"internal error while reading the request: {type(e).__name__}: {e}",
                             "INTERNAL")
        return None

    def _refuse(self, sender, message: str, code: str) -> None:
        self.service.count_rejected()
        try:
            send_error(sender, message, code)
        except Exception:  # the client is gone
            pass

    def _execute_one(self, request, sender) -> None:
        try:
            check_request_parameters(json.loads(request.parameters() or "{}"))
            parsed = parse_request(request_inputs(request), self.lm, self.params, self.limits)
        except ValueError as e:  # RequestError, SamplingError: the message names the input
            return self._refuse(sender, str(e), "INVALID_ARG")
        if parsed.command == "stats":
            return self._send_stats(sender)
        if parsed.command == "drain":
            token = os.environ.get(DRAIN_TOKEN_ENV, "")
            if not token or not hmac.compare_digest(parsed.argument.encode(), token.encode()):
                return self._refuse(sender, "command drain needs the launcher's token", "INVALID_ARG")
            self.service.drain(timeout=5)
            return self._send_stats(sender)
        try:
            self.service.submit(parsed.request, TritonSink(request, sender, parsed, self.lm.tokenizer))
        except Exception as e:  # ServiceClosed: shutting down
            self._refuse(sender, str(e), "UNAVAILABLE")

    def _send_stats(self, sender) -> None:
        stats = {**self.service.stats(), "model": self.model_name, "executor": self.lm.settings.executor,
                 "pid": os.getpid(), "server_pid": os.getppid(), "draining": self.service.draining}
        tensors = [pb_utils.Tensor("text_output", np.array([b""], dtype=np.object_)),
                   pb_utils.Tensor("output_ids", np.zeros(0, dtype=np.int32)),
                   pb_utils.Tensor("finish_reason", np.array([b"stats"], dtype=np.object_)),
                   pb_utils.Tensor("counters", np.array([json.dumps(stats).encode()], dtype=np.object_))]
        sender.send(pb_utils.InferenceResponse(output_tensors=tensors),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _watch(self, parent: int, interval_s: float = 0.25) -> None:
        """The model's watchdog thread. Exits the process at once when tritonserver (``parent``) is gone (killed,
        crashed: the stub itself notices only after seconds, and must never hold the model on its own). Drains
        the service when the server unloads this model while requests are in flight (tritonserver got SIGTERM
        directly: it would wait for the streams, then exit under them): they end with "the server is shutting
        down" at once."""
        checks = 0
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                _exit_now()
            checks += 1
            if checks % 2 or self.service.draining or not self.service.stats().get("requests_in_flight"):
                continue
            try:
                ready = pb_utils.is_model_ready(self.model_name)
            except Exception as e:  # "Server not ready" once the server is stopping; else decide next round
                if "not ready" not in str(e):
                    continue
                ready = False
            if not ready:
                _log_warn("trimode: the model is being unloaded with requests in flight: ending them")
                self.service.drain(timeout=5)

    def finalize(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:  # anything still in flight ends with "the server is shutting down"
            service.close(timeout=5)
        if getattr(self, "comm", None) is not None:  # release the worker ranks (they exit), then the group
            try:
                self.lm.executor.close()
            except Exception as e:  # a worker already gone: it stops on its own
                _log_warn(f"trimode: releasing the tensor-parallel workers failed: {e}")


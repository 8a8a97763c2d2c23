"""A thread-safe front for the single-threaded ``Engine``: one loop thread owns the engine and its KV cache.

Servers (the Triton Python backend in ``runtime.serving.triton_model``, or anything else) call ``submit`` and
``cancel`` from any thread; the loop takes them from an inbox between engine steps, so requests join and
leave the running batch between forwards (continuous batching, modes mixed freely). Each request reports
through its ``Sink``, called from the loop thread:

- ``on_tokens(ids)`` for every group of accepted tokens (return False to stop the request there, e.g. a stop
  string matched: it then finishes with reason "stop");
- ``on_finish(result, timing)`` once when it ends normally ("stop", "length") or is cancelled;
- ``on_error(message, code)`` once instead, when it is rejected or fails; ``code`` says whose fault it is:
  ``INVALID_ARG`` (the request can never run here), ``UNAVAILABLE`` (the server's state: busy, shutting down,
  KV cache exhausted: retry later) or ``INTERNAL`` (the gRPC status names, as Triton's error codes).

``sink.is_cancelled()`` is polled while a request is in flight (client gone); a cancelled request leaves the
batch at the next step boundary and its pages are freed.

KV admission (``admission``):
- ``"reserve"`` (default): a request enters the engine only when the worst case of every admitted request
  (prompt + max_new_tokens, in pages) fits the pool, so page exhaustion cannot happen mid-generation;
  requests wait in arrival order until it fits, and one whose worst case exceeds the whole pool is rejected.
- ``"greedy"``: requests enter at once; when no running sequence can get a page, the engine fails the newest
  stuck one with its ``KVCacheExhausted`` message (higher occupancy, but requests may fail under load).

Queue limit (``max_queued``): only requests that cannot start at the next step count as queued (waiting for
pages, or for a slot in the running batch); a request that can start at once is never refused as "busy".

Stopping: ``drain`` ends every request in flight with the error "the server is shutting down" (pages freed)
and refuses new ones, keeping the loop alive (the Triton model does this when its server is being stopped,
so that every stream gets a final response); ``close`` does the same and stops the loop. ``count_rejected``
counts a request refused before it reached the service (a bad request), so that stats see every refusal.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from trimode.runtime.api import TriModeLM
from trimode.runtime.kv_cache import KVCacheExhausted
from trimode.runtime.request import GenerationRequest, GenerationResult, RequestError

ADMISSION_POLICIES = ("reserve", "greedy")


# whose fault an error is (on_error's code): the request's, the server's state (retry later), or a failure
INVALID_ARG, UNAVAILABLE, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "INTERNAL"


class Sink(Protocol):
    def on_tokens(self, ids: list[int]) -> bool | int | None: ...  # False / int k: stop (keeping k of ids)
    def on_finish(self, result: GenerationResult, timing: dict) -> None: ...
    def on_error(self, message: str, code: str) -> None: ...
    def is_cancelled(self) -> bool: ...


SHUTTING_DOWN = "the server is shutting down"


class ServiceClosed(RuntimeError):
    """The service has been closed or drained; no new requests are taken."""


@dataclass
class _Entry:
    handle: int
    request: GenerationRequest
    sink: Sink
    pages: int                                   # worst-case pages (reserve admission)
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    seq_id: int | None = None
    cancel_requested: bool = False               # client went away / cancel()
    error_code: str | None = None                # set when the service ends it (shutting down, a failed step)
    num_tokens: int = 0


class EngineService:
    def __init__(self, lm: TriModeLM, max_queued: int = 1024, admission: str = "reserve",
                 cancel_poll_s: float = 0.02, on_stats: Callable[[dict], None] | None = None,
                 keepalive_s: float | None = None) -> None:
        """``keepalive_s``: while idle, call ``lm.executor.keepalive()`` at least this often (tensor-parallel
        rank 0: the workers wait for its next step under a collective timeout)."""
        if admission not in ADMISSION_POLICIES:
            raise ValueError(f"admission must be one of {ADMISSION_POLICIES}, got {admission!r}")
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        self.lm, self.engine, self.cache = lm, lm.engine, lm.cache
        self.max_queued, self.admission, self.cancel_poll_s = max_queued, admission, cancel_poll_s
        self.on_stats = on_stats
        self.keepalive_s = keepalive_s
        self._last_step = time.monotonic()
        self._cv = threading.Condition()
        self._inbox: list[tuple[str, object]] = []
        self._closing = False
        self._draining = False
        self._handles = itertools.count(1)
        self._pending: deque[_Entry] = deque()   # accepted, not yet in the engine (reserve admission)
        self._by_seq: dict[int, _Entry] = {}     # in the engine
        self._by_handle: dict[int, _Entry] = {}  # every entry in flight
        self._reserved_pages = 0
        self._totals = {"completed": 0, "cancelled": 0, "errors": 0, "rejected": 0, "tokens": 0, "steps": 0}
        self._stats: dict = {}
        self._last_poll = 0.0
        self._publish_stats()
        self._thread = threading.Thread(target=self._loop, name="trimode-engine-loop", daemon=True)
        self._thread.start()

    # ---- any thread -----------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Sink) -> int:
        """Queue a request; returns a handle for ``cancel``. Rejections arrive through ``sink.on_error``."""
        with self._cv:
            if self._closing or self._draining:
                raise ServiceClosed(SHUTTING_DOWN)
            handle = next(self._handles)
            self._inbox.append(("submit", (handle, request, sink)))
            self._cv.notify()
        return handle

    def cancel(self, handle: int) -> None:
        with self._cv:
            self._inbox.append(("cancel", handle))
            self._cv.notify()

    def count_rejected(self, n: int = 1) -> None:
        """Count ``n`` requests refused before ``submit`` (bad input, refused by the server): the ``rejected``
        total of ``stats`` and the metrics covers every refusal."""
        with self._cv:
            self._inbox.append(("rejected", n))
            self._cv.notify()

    def drain(self, timeout: float = 10.0) -> bool:
        """Refuse new requests (``ServiceClosed``) and end every request in flight with the error "the server is
        shutting down", freeing its pages; the loop keeps running (stats still answer). Returns True once
        nothing is in flight, False if that took longer than ``timeout`` seconds."""
        with self._cv:
            self._draining = True
            self._inbox.append(("drain", None))
            self._cv.notify_all()
        return self.wait_idle(timeout)

    @property
    def draining(self) -> bool:
        return self._draining or self._closing

    def stats(self) -> dict:
        """A snapshot taken by the loop after its last step (pages in use, requests in flight, totals)."""
        with self._cv:
            return dict(self._stats)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until nothing is in flight (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._stats.get("requests_in_flight") or self._inbox:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Fail everything in flight with "the server is shutting down", free its pages and stop the loop."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # ---- the loop thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self._closing and not self._has_work():
                    if self.keepalive_s is None:
                        self._cv.wait()
                        continue
                    self._cv.wait(max(0.0, self._last_step + self.keepalive_s - time.monotonic()))
                    if time.monotonic() >= self._last_step + self.keepalive_s:
                        break  # idle too long: tell the workers rank 0 is alive (below, outside the lock)
                inbox, self._inbox = self._inbox, []
                closing = self._closing
            if self.keepalive_s is not None and time.monotonic() >= self._last_step + self.keepalive_s:
                self._keepalive()
            drain = False
            for op, arg in inbox:
                if op == "submit":
                    self._accept(*arg)
                elif op == "cancel":
                    entry = self._by_handle.get(arg)
                    if entry is not None:
                        entry.cancel_requested = True
                elif op == "rejected":
                    self._totals["rejected"] += arg
                elif op == "drain":
                    drain = True
            if closing:
                self._shutdown()
                return
            if drain:
                self._end_all(SHUTTING_DOWN)
                continue
            self._poll_cancelled(force=bool(inbox))
            self._apply_cancellations()
            self._admit()
            if self.engine.has_work:
                self._last_step = time.monotonic()
                try:
                    self.engine.step()
                    self._totals["steps"] += 1
                except Exception as e:  # an executor failure: fail what is in the engine, keep serving
                    self._fail_engine(f"engine step failed: {type(e).__name__}: {e}")
                self._apply_cancellations()
            self._collect()
            self._publish_stats()

    def _keepalive(self) -> None:
        self._last_step = time.monotonic()
        executor = self.lm.executor
        if getattr(executor, "is_broken", False) or getattr(executor, "is_closed", False):
            return
        try:
            executor.keepalive()
        except Exception as e:  # a worker rank is gone: every later step fails, naming this error
            executor.is_broken = True
            print(f"trimode: tensor-parallel keepalive failed: {e}", file=sys.stderr, flush=True)

    def _has_work(self) -> bool:
        return bool(self._pending or self.engine.has_work)

    def _worst_case_pages(self, request: GenerationRequest) -> int:
        # No pass ever keeps K/V past prompt + max_new_tokens positions (AR, diffusion and spec alike).
        return self.cache.pages_for(len(request.prompt_ids) + request.max_new_tokens)

    def _queued(self) -> int:
        """Requests that cannot start at the next step: waiting for pages, or beyond the running batch's free
        slots."""
        in_engine = len(self.engine.running) + len(self.engine.waiting)
        return len(self._pending) + max(0, in_engine - self.engine.max_batch_size)

    def _can_start_now(self, entry: _Entry) -> bool:
        if self._pending or len(self.engine.running) + len(self.engine.waiting) >= self.engine.max_batch_size:
            return False
        return self.admission != "reserve" or self._reserved_pages + entry.pages <= self.cache.num_pages

    def _accept(self, handle: int, request: GenerationRequest, sink: Sink) -> None:
        entry = _Entry(handle, request, sink, self._worst_case_pages(request))
        self._admit()  # earlier submissions of this inbox first: what fits now is not queued
        if not self._can_start_now(entry):
            queued = self._queued()
            if queued >= self.max_queued:
                return self._reject(entry, f"server busy: {queued} requests are already queued "
                                           f"(max_queued_requests={self.max_queued}); retry later", UNAVAILABLE)
        if self.admission == "reserve" and entry.pages > self.cache.num_pages:
            return self._reject(entry, f"request too large for the KV cache: prompt ({len(request.prompt_ids)} "
                                       f"tokens) + max_tokens ({request.max_new_tokens}) needs up to {entry.pages} "
                                       f"pages of {self.cache.page_size} tokens, but the KV page budget is "
                                       f"{self.cache.num_pages} pages", INVALID_ARG)
        self._by_handle[handle] = entry
        self._pending.append(entry)

    def _reject(self, entry: _Entry, message: str, code: str) -> None:
        self._totals["rejected"] += 1
        self._safe(entry.sink.on_error, message, code)

    def _admit(self) -> None:
        while self._pending:
            entry = self._pending[0]
            if entry.cancel_requested:
                self._pending.popleft()
                self._finish_unstarted(entry)
                continue
            if self.admission == "reserve" and self._reserved_pages + entry.pages > self.cache.num_pages:
                return
            self._pending.popleft()
            try:
                seq_id = self.engine.add_request(entry.request, self._token_callback(entry))
            except RequestError as e:
                del self._by_handle[entry.handle]
                self._reject(entry, str(e), INVALID_ARG)
                continue
            entry.seq_id, entry.admitted = seq_id, time.perf_counter()
            self._by_seq[seq_id] = entry
            if self.admission == "reserve":
                self._reserved_pages += entry.pages

    def _token_callback(self, entry: _Entry):
        def on_tokens(_: int, ids: list[int]) -> bool | int | None:
            if entry.first_token is None:
                entry.first_token = time.perf_counter()
            entry.num_tokens += len(ids)
            if entry.cancel_requested:
                return None
            try:
                # False / k: the sink's output ended (a stop string); the engine ends the request now, keeping
                # what the sink kept, so the result and its counters hold exactly the tokens sent
                return entry.sink.on_tokens(ids)
            except Exception:  # the client is gone: stop generating for it
                entry.cancel_requested = True
                return None
        return on_tokens

    def _poll_cancelled(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_poll < self.cancel_poll_s:
            return
        self._last_poll = now
        for entry in self._by_handle.values():
            if not entry.cancel_requested:
                try:
                    if entry.sink.is_cancelled():
                        entry.cancel_requested = True
                except Exception:
                    entry.cancel_requested = True

    def _apply_cancellations(self) -> None:
        for seq_id, entry in list(self._by_seq.items()):
            if entry.cancel_requested and seq_id not in self.engine.finished:
                self.engine.cancel(seq_id)   # frees its pages now (or when it leaves the waiting queue)

    def _collect(self) -> None:
        for seq_id in [s for s in self.engine.finished if s in self._by_seq]:
            result = self.engine.pop_result(seq_id)
            entry = self._by_seq.pop(seq_id)
            del self._by_handle[entry.handle]
            if self.admission == "reserve":
                self._reserved_pages -= entry.pages
            self._totals["tokens"] += len(result.token_ids)
            if result.finish_reason == "error":
                self._totals["errors"] += 1
                code = entry.error_code or (UNAVAILABLE if isinstance(result.exception, KVCacheExhausted)
                                            else INTERNAL)
                self._safe(entry.sink.on_error, result.error or "generation failed", code)
                continue
            if result.finish_reason == "cancelled":
                self._totals["cancelled"] += 1
            else:
                self._totals["completed"] += 1
            if self.lm.tokenizer is not None:
                result.text = self.lm.tokenizer.decode(result.token_ids)
            self._safe(entry.sink.on_finish, result, self._timing(entry))

    def _timing(self, entry: _Entry) -> dict:
        now = time.perf_counter()
        admitted = entry.admitted or now
        return {"queue_s": round(admitted - entry.submitted, 6),
                "ttft_s": None if entry.first_token is None else round(entry.first_token - entry.submitted, 6),
                "latency_s": round(now - entry.submitted, 6), "worst_case_pages": entry.pages}

    def _finish_unstarted(self, entry: _Entry) -> None:
        self._by_handle.pop(entry.handle, None)
        self._totals["cancelled"] += 1
        result = GenerationResult(-1, list(entry.request.prompt_ids), [], "cancelled", {}, [], [], 0.0)
        self._safe(entry.sink.on_finish, result, self._timing(entry))

    def _fail_engine(self, message: str, code: str = INTERNAL) -> None:
        """Take every request of ours out of the engine (pages freed) and report ``message`` as its error."""
        for entry in self._by_seq.values():
            entry.error_code = code
        for seq_id in self._by_seq:
            if seq_id not in self.engine.finished:
                self.engine.cancel(seq_id)
        while self.engine.waiting:  # cancelled while waiting: they leave the queue at once
            seq = self.engine.waiting.popleft()
            self.engine.finished[seq.seq_id] = seq.result()
        for seq_id in self._by_seq:
            result = self.engine.finished.get(seq_id)
            if result is not None:
                result.finish_reason, result.error = "error", message

    def _end_all(self, message: str) -> None:
        """End every request in flight with the error ``message`` (queued ones rejected, running ones failed,
        their pages freed)."""
        while self._pending:
            entry = self._pending.popleft()
            self._by_handle.pop(entry.handle, None)
            self._reject(entry, message, UNAVAILABLE)
        self._fail_engine(message, UNAVAILABLE)
        self._collect()
        self._publish_stats()

    def _shutdown(self) -> None:
        self._end_all(SHUTTING_DOWN)
        with self._cv:
            self._cv.notify_all()

    def _publish_stats(self) -> None:
        cache = self.cache.stats()
        waiting = len(self.engine.waiting) + len(self._pending)
        snapshot = {"num_pages": cache.num_pages, "page_size": self.cache.page_size,
                    "pages_used": cache.num_used_pages, "pages_free": cache.num_free_pages,
                    "pages_reserved": self._reserved_pages, "cache_sequences": cache.num_sequences,
                    "requests_running": len(self.engine.running), "requests_waiting": waiting,
                    "requests_in_flight": len(self._by_handle), "admission": self.admission, **self._totals}
        with self._cv:
            changed = snapshot != self._stats
            self._stats = snapshot
            self._cv.notify_all()
        if changed and self.on_stats is not None:
            self._safe(self.on_stats, snapshot)

    @staticmethod
    def _safe(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # a sink that fails (client gone) must not stop the loop
            pass

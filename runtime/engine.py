"""The decoding loop and scheduler: one loop for every mode, many concurrent requests, one KV cache.

Each ``step``: admit waiting requests (prefill), ask each running sequence's mode policy for its next pass,
reserve pages for the passes that keep K/V, run all passes in one executor forward (modes mix freely in a
batch), hand each sequence its logits, apply rollbacks, and retire finished sequences (freeing their pages).

Page exhaustion never crashes the loop and never leaks: a sequence whose pages cannot be reserved waits
while others make progress; if no sequence can progress, the newest stuck one fails with the
``KVCacheExhausted`` message and its pages are freed.
"""

from __future__ import annotations

import itertools
from collections import deque

from trimode.runtime.executors.base import Executor
from trimode.runtime.kv_cache import KVCacheExhausted
from trimode.runtime.modes import make_policies
from trimode.runtime.passes import PassKind, SeqPass
from trimode.runtime.request import GenerationRequest, GenerationResult, RequestError, SequenceState, TokenCallback
from trimode.runtime.settings import DEFAULTS


class Engine:
    def __init__(self, executor: Executor, mask_token_id: int, max_position_embeddings: int,
                 max_batch_size: int = DEFAULTS.max_batch_size) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.executor, self.cache = executor, executor.cache
        self.policies = make_policies(mask_token_id)
        self.max_positions = max_position_embeddings
        self.max_batch_size = max_batch_size
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
        self.finished: dict[int, GenerationResult] = {}
        self.num_steps = 0
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------------------

    def add_request(self, request: GenerationRequest, on_tokens: TokenCallback | None = None) -> int:
        """Queue a request; returns its id. Raises ``RequestError`` for requests that can never run."""
        total = len(request.prompt_ids) + request.max_new_tokens
        if total > self.max_positions:
            raise RequestError(f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                               f"({request.max_new_tokens}) exceeds the model's {self.max_positions} positions")
        capacity = self.cache.num_pages * self.cache.page_size
        if len(request.prompt_ids) + 1 > capacity:
            raise RequestError(f"the prompt ({len(request.prompt_ids)} tokens) does not fit in the KV cache "
                               f"({capacity} tokens in all)")
        seq = SequenceState(next(self._ids), request, request.mode, request.sampling.generator(), on_tokens=on_tokens)
        self.waiting.append(seq)
        return seq.seq_id

    def cancel(self, seq_id: int) -> None:
        """Stop a request now (e.g. its client went away) and free its pages."""
        for seq in list(self.waiting) + self.running:
            if seq.seq_id == seq_id and not seq.is_finished:
                seq.finish_reason = "cancelled"
        self._retire()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def pop_result(self, seq_id: int) -> GenerationResult:
        return self.finished.pop(seq_id)

    # ---- the loop -------------------------------------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting.popleft()
            if seq.is_finished:  # cancelled while waiting
                self.finished[seq.seq_id] = seq.result()
                continue
            self.cache.add_sequence(seq.seq_id)
            self.running.append(seq)

    def _plan(self, seq: SequenceState) -> SeqPass | None:
        if not seq.is_prefilled:
            return SeqPass(seq.seq_id, PassKind.PREFILL, seq.request.prompt_ids, 0)
        if seq.policy_state is None:  # at a step boundary: a scheduled mode switch takes effect here
            for after, mode in seq.request.switches:
                if len(seq.generated) >= after:
                    seq.mode = mode
        return self.policies[seq.mode.mode].plan(seq, self.cache.length(seq.seq_id))

    def step(self) -> list[int]:
        """Run one forward over every running sequence. Returns the ids of requests that finished."""
        self._admit()
        planned: list[tuple[SequenceState, SeqPass]] = []
        stuck: list[tuple[SequenceState, KVCacheExhausted]] = []
        for seq in self.running:
            p = None if seq.is_finished else self._plan(seq)
            if p is None:
                continue
            if p.kind.keeps_kv:
                try:
                    self.cache.reserve(seq.seq_id, p.end_pos)
                except KVCacheExhausted as e:
                    stuck.append((seq, e))
                    continue
            planned.append((seq, p))
        if not planned and stuck:  # nobody can progress: fail the newest stuck sequence, the rest retry
            seq, err = stuck[-1]
            seq.finish_reason, seq.error, seq.exception = "error", str(err), err
        if planned:
            all_logits = self.executor.forward([p for _, p in planned])
            self.num_steps += 1
            for (seq, p), logits in zip(planned, all_logits):
                seq.forwards[p.kind.value] += 1
                if p.kind.keeps_kv:
                    self.cache.set_length(seq.seq_id, p.end_pos)
                if p.kind is PassKind.PREFILL:
                    seq.is_prefilled, seq.next_logits = True, logits[-1]
                else:
                    self.policies[seq.mode.mode].consume(seq, p, logits)
                if seq.truncate_to is not None:
                    self.cache.truncate(seq.seq_id, seq.truncate_to)
                    seq.truncate_to = None
        return self._retire()

    def _retire(self) -> list[int]:
        done = [s for s in self.running if s.is_finished]
        for seq in done:
            self.cache.free(seq.seq_id)
            self.running.remove(seq)
            self.finished[seq.seq_id] = seq.result()
        return [s.seq_id for s in done]

    def run(self, requests: list[GenerationRequest], on_tokens: TokenCallback | None = None) -> list[GenerationResult]:
        """Run requests to completion (continuing any already queued) and return their results in order."""
        ids = [self.add_request(r, on_tokens) for r in requests]
        try:
            while any(i not in self.finished for i in ids):
                self.step()
        except BaseException:
            # an executor failure or an interrupt: nothing of these requests may stay in the cache
            for seq in list(self.waiting) + self.running:
                if seq.seq_id in ids and not seq.is_finished:
                    seq.finish_reason, seq.error = "error", "aborted"
            self.waiting = deque(s for s in self.waiting if not s.is_finished)
            self._retire()
            raise
        return [self.pop_result(i) for i in ids]

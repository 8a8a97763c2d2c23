"""The decoding loop and scheduler: one loop for every mode, many concurrent requests, one KV cache.

Each ``step``: admit waiting requests (prefill), apply scheduled mode switches at step boundaries, let mode
``auto`` choose each of its sequences' mode for the next cycle (runtime.scheduling), ask each running sequence's
mode policy for its next pass (fused spec: its chain and sub-block passes, which must share one forward), reserve
pages for the passes that keep K/V, run all passes in one executor forward (modes mix freely in a batch), hand
each sequence its logits, apply rollbacks, and retire finished sequences (freeing their pages).

Page exhaustion never crashes the loop and never leaks: a sequence whose pages cannot be reserved waits
while others make progress; if no sequence can progress, the newest stuck one fails with the
``KVCacheExhausted`` message and its pages are freed.

A failure caused by one sequence fails only that sequence (``finish_reason`` "error", its exception kept on
the result); the step goes on for the others: an exception while planning or consuming its pass (sampling,
a callback), or a forward that fails with it in the batch but not without it (the batch's passes are then
run one by one to find the culprit). Interrupts (``BaseException`` other than ``Exception``) propagate.

Build-time limits (an engine directory's ``EngineLimits``): a request beyond what the engines can ever hold
(sequence length, a pass longer than its engine kind's tokens per forward, a mode not built) is refused by
``add_request`` with a ``RequestError`` naming the limit; passes that fit alone but not together wait for a
later step (each engine kind's tokens per forward are a budget filled in admission order).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import deque
from collections.abc import Sequence

from trimode.runtime.admission import check_request, fits, max_sequence_tokens
from trimode.runtime.executors.base import Executor
from trimode.runtime.executors.engine_dir import EngineLimits
from trimode.runtime.executors.engine_kinds import PASS_TO_KIND
from trimode.runtime.kv_cache import KVCacheExhausted
from trimode.runtime.modes import ModePolicy, make_policies
from trimode.runtime.passes import PassKind, SeqPass
from trimode.runtime.request import (ARConfig, AutoConfig, FusedSpecConfig, GenerationRequest, GenerationResult, Mode,
                                     SequenceState, SpecConfig, TokenCallback)
from trimode.runtime.scheduling import (FUSED_PRIOR, AcceptanceEstimate, AutoScheduler, Candidate, CostTableError,
                                        DefaultCosts)
from trimode.runtime.settings import DEFAULTS

_log = logging.getLogger("trimode")


class Engine:
    """The decoding loop over one executor and its KV cache (see the module docstring).

    ``max_position_embeddings``: positions per sequence (prompt + new tokens); ``max_batch_size``: sequences
    in the running batch (the rest wait); ``limits``: an engine directory's build-time limits (None: only the
    model's and the pool's). ``decide``: greedy passes take the engine's decisions (``SeqPass.decide``); None or
    True: whenever the executor can (``Executor.decides``; an executor that cannot gets logits passes, whatever
    is asked); False: every pass returns logits, as before the engines decided (same tokens; for comparisons).
    Under an engine directory's limits a verify pass with more drafts than the built ``block_length`` takes
    logits (the engines' decision inputs are sized for that block)."""

    def __init__(self, executor: Executor, mask_token_id: int, max_position_embeddings: int,
                 max_batch_size: int = DEFAULTS.max_batch_size, limits: EngineLimits | None = None,
                 decide: bool | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if limits is not None and max_batch_size > limits.max_batch:
            raise ValueError(f"max_batch_size {max_batch_size} exceeds the max_batch of {limits.max_batch} "
                             f"the engines of {limits.source} were built for")
        self.executor, self.cache = executor, executor.cache
        self.policies = make_policies(mask_token_id)
        self.max_positions = max_position_embeddings
        self.max_batch_size = max_batch_size
        self.limits = limits
        self.decide = decide is not False
        self.scheduler = AutoScheduler()  # mode auto's costs: set .costs to a measured PassCostTable
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
        self.finished: dict[int, GenerationResult] = {}
        self.num_steps = 0
        self._ids = itertools.count()

    @property
    def decide(self) -> bool:
        """Whether greedy passes take the engine's decisions: asked for and the executor can."""
        return self._decide

    @decide.setter
    def decide(self, value: bool) -> None:
        self._decide = bool(value) and self.executor.decides

    # ---- requests -------------------------------------------------------------------------------------

    @property
    def max_sequence_tokens(self) -> int:
        """The most tokens (prompt + new) one sequence can ever hold here (``admission.max_sequence_tokens``)."""
        return max_sequence_tokens(self.max_positions, self.cache, self.limits)

    def check_request(self, request: GenerationRequest) -> None:
        """Raise ``RequestError`` naming the limit if ``request`` can never run here (``admission.check_request``:
        the model's positions, the whole page pool, an engine directory's modes, sequence length and tokens per
        forward)."""
        check_request(request, self.max_positions, self.cache, self.limits)

    def add_request(self, request: GenerationRequest, on_tokens: TokenCallback | None = None) -> int:
        """Queue a request; returns its id. Raises ``RequestError`` for requests that can never run
        (``check_request``)."""
        self.check_request(request)
        seq = SequenceState(next(self._ids), request, request.mode, request.sampling.generator(), on_tokens=on_tokens)
        self._select_mode(seq)
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

    @staticmethod
    def _select_mode(seq: SequenceState) -> None:
        """The mode selected at a step boundary: the request's, or the last scheduled switch reached. ``auto``
        keeps the mode it chose until ``_decide_auto`` chooses again (AR until its first decision)."""
        selected = seq.request.mode
        for after, mode in seq.request.switches:
            if len(seq.generated) >= after:
                selected = mode
        if isinstance(selected, AutoConfig):
            if seq.auto is None:
                seq.mode, seq.acceptance = ARConfig(), seq.acceptance or AcceptanceEstimate()
                seq.fused_acceptance = seq.fused_acceptance or AcceptanceEstimate(prior=FUSED_PRIOR)
            seq.auto = selected
        else:
            seq.mode, seq.auto = selected, None
        if seq.carry is not None and seq.mode.mode is not Mode.FUSED_SPEC:
            seq.carry = None  # fused spec's drafts serve only its own next step

    def _at_boundary(self, seq: SequenceState) -> bool:
        return seq.is_prefilled and seq.policy_state is None and not seq.is_finished

    def _decide_auto(self) -> None:
        """Mode ``auto``: choose AR, spec or fused spec (and the block length) for every auto sequence at a step
        boundary, from the pass costs and their acceptance (runtime.scheduling)."""
        deciding = [s for s in self.running if s.auto is not None and self._at_boundary(s)]
        if not deciding:
            return
        sched = self.scheduler
        if not sched.warned and isinstance(sched.costs, DefaultCosts):
            sched.warned = True
            _log.warning("trimode: mode auto: no pass costs measured for this machine and executor; using the "
                         "built-in conservative model. Measure them: trimode profile --model DIR --save "
                         "(or --engine DIR)")
        try:
            self._decide_auto_with(deciding)
        except CostTableError as e:  # a table without a kind looked up: decide with the default model instead
            _log.warning("trimode: mode auto: %s; using the built-in cost model", e)
            sched.costs = DefaultCosts()
            self._decide_auto_with(deciding)

    def _decide_auto_with(self, deciding: list[SequenceState]) -> None:
        sched = self.scheduler
        n = len(self.running)
        fixed_tokens = fixed_ms = 0.0
        deciding_ids = {s.seq_id for s in deciding}
        for seq in self.running:
            if seq.seq_id in deciding_ids or seq.is_finished:
                continue
            block = getattr(seq.mode, "block_length", 1) if seq.is_prefilled else 1
            kind = {Mode.AR: "decode", Mode.DIFFUSION: "draft"}.get(seq.mode.mode, "verify")  # denoise ~ draft
            fixed_tokens += 1.0
            fixed_ms += sched.costs.cost_ms(kind, n, 1 if kind == "decode" else block) / n
        lengths = sorted({b for s in deciding for b in s.auto.block_lengths})
        fused = self._auto_fused_subblocks(max(s.auto.fused_subblocks for s in deciding), max(lengths))
        decision = sched.decide([Candidate(s.acceptance.value, s.num_remaining, s.fused_acceptance.value,
                                           s.carry is not None and s.mode.mode is Mode.FUSED_SPEC)
                                 for s in deciding], n, lengths, fixed_tokens, fixed_ms, fused)
        for seq, choice in zip(deciding, decision.choices):
            if choice is not None and choice[0] == "fused_spec" and not seq.auto.fused_subblocks:
                choice = ("spec", choice[1])  # another request's option: the nearest of its own
            k = min(seq.auto.fused_subblocks, fused)
            if choice is not None and choice[1] not in seq.auto.block_lengths:
                choice = (choice[0], min(seq.auto.block_lengths, key=lambda b: (abs(b - choice[1]), b)))
            if choice is None:
                seq.mode = ARConfig()
                seq.acceptance.observe_ar()
                seq.fused_acceptance.observe_ar()
                key = "ar"
            else:
                mode, block = choice
                if mode == "spec":
                    seq.mode = SpecConfig(block, 0.0, seq.auto.use_lora)
                else:  # the same config while it stays fused: its drafts carry over to the next step
                    seq.mode = FusedSpecConfig(block, min(k, block), block, seq.auto.use_lora)
                key = f"{mode}:{block}"
            seq.auto_choices[key] = seq.auto_choices.get(key, 0) + 1

    def _auto_fused_subblocks(self, wanted: int, longest: int) -> int:
        """How many sub-blocks auto's fused spec option may have here: ``wanted``, fewer where an engine
        directory's limits hold fewer draft passes (max_batch) or tokens per forward; 0: no fused option."""
        if self.limits is None or not wanted:
            return wanted
        most = self.limits.max_tokens.get(PASS_TO_KIND[PassKind.DRAFT])
        k = min(wanted, self.limits.max_batch, wanted if most is None else most // longest)
        return max(k, 0)

    def _plan(self, seq: SequenceState) -> SeqPass | list[SeqPass] | None:
        if not seq.is_prefilled:
            return SeqPass(seq.seq_id, PassKind.PREFILL, seq.request.prompt_ids, 0,
                           decide=seq.request.sampling.is_greedy)
        return self.policies[seq.mode.mode].plan(seq, self.cache.length(seq.seq_id))

    @staticmethod
    def _fail(seq: SequenceState, error: BaseException, message: str | None = None) -> None:
        seq.finish_reason, seq.exception = "error", error
        seq.error = message or f"{type(error).__name__}: {error}"

    def _decides(self, p: SeqPass) -> bool:
        """Whether pass ``p`` (which asks) takes the engine's decision: the engine decides, and under an engine
        directory's limits a causal pass's drafts fit the built block (the decision inputs' profile)."""
        if not (p.decide and self.decide):
            return False
        return self.limits is None or not p.kind.is_causal or p.num_logits - 1 <= self.limits.block_length

    def step(self) -> list[int]:
        """Run one forward over every running sequence. Returns the ids of requests that finished."""
        self._admit()
        for seq in self.running:  # a scheduled mode switch takes effect at a step boundary
            if (seq.request.switches or seq.auto is not None) and self._at_boundary(seq):
                self._select_mode(seq)  # (a request without switches keeps the mode add_request selected)
        try:
            self._decide_auto()
        except Exception as e:  # a broken cost table: the auto sequences fail, the others go on
            for seq in self.running:
                if seq.auto is not None and not seq.is_finished:
                    self._fail(seq, e)
        planned: list[tuple[SequenceState, list[SeqPass]]] = []
        stuck: list[tuple[SequenceState, KVCacheExhausted]] = []
        used: dict[str, int] = {}
        for seq in self.running:
            try:
                p = None if seq.is_finished else self._plan(seq)
            except Exception as e:  # this sequence's fault (e.g. its sampling, its callback): it alone fails
                self._fail(seq, e)
                continue
            if p is None:
                continue
            passes = p if isinstance(p, list) else [p]  # several: one sequence's passes of one forward
            if any(q.decide for q in passes):
                passes = [q if self._decides(q) else dataclasses.replace(q, decide=False, decide_rows=())
                          for q in passes]
            if not fits(passes, used, self.limits):  # over its engine kinds' budgets: next step
                continue
            kept = [q.end_pos for q in passes if q.kind.keeps_kv]
            if kept:
                try:
                    self.cache.reserve(seq.seq_id, max(kept))
                except KVCacheExhausted as e:
                    stuck.append((seq, e))
                    continue
            for q in passes:
                kind = PASS_TO_KIND[q.kind]
                used[kind] = used.get(kind, 0) + q.num_tokens
                used[("passes", kind)] = used.get(("passes", kind), 0) + 1
            planned.append((seq, passes))
        if not planned and stuck:  # nobody can progress: fail the newest stuck sequence, the rest retry
            seq, err = stuck[-1]
            self._fail(seq, err, str(err))
        if planned:
            all_outputs = self._forward(planned)
            self.num_steps += 1
            for (seq, passes), outs in zip(planned, all_outputs):
                if outs is not None:
                    self._consume(seq, passes, outs)
        return self._retire()

    def _forward(self, planned: list[tuple[SequenceState, list[SeqPass]]]) -> list:
        """Outputs per sequence (a list of ``PassOutput``, one per pass); None for a sequence that failed. A failed batched forward
        is retried sequence by sequence (a sequence's passes stay in one forward: a fused step's sub-blocks read
        the K/V its chain writes), so that only the sequences whose passes fail on their own fail (unless the
        executor is broken)."""
        try:
            flat = iter(self.executor.forward([p for _, passes in planned for p in passes]))
            return [[next(flat) for _ in passes] for _, passes in planned]
        except Exception as e:
            if len(planned) == 1 or getattr(self.executor, "is_broken", False):
                for seq, _ in planned:
                    self._fail(seq, e)
                return [None] * len(planned)
        out = []
        for seq, passes in planned:
            try:
                out.append(list(self.executor.forward(passes)))
            except Exception as e:
                self._fail(seq, e)
                out.append(None)
        return out

    def _consume(self, seq: SequenceState, passes: list[SeqPass], outs: list) -> None:
        """Apply one sequence's outputs; a step counts one forward of its first pass's kind (a fused step: verify)."""
        p = passes[0]
        seq.forwards[p.kind.value] += 1
        fused_drafts = getattr(seq.policy_state, "from_subblocks", False)  # whose drafts this verify judges
        for q in passes:
            if q.kind.keeps_kv:
                self.cache.set_length(seq.seq_id, q.end_pos)
        try:
            if p.kind is PassKind.PREFILL:
                seq.is_prefilled = True
                ModePolicy.set_next(seq, outs[0])
            elif len(passes) == 1:
                self.policies[seq.mode.mode].consume(seq, p, outs[0])
            else:
                self.policies[seq.mode.mode].consume_group(seq, passes, outs)
        except Exception as e:  # this sequence's fault: it alone fails (its pages are freed when it retires)
            self._fail(seq, e)
            seq.truncate_to = None
            return
        if p.kind is PassKind.VERIFY and seq.auto is not None and seq.accepted_lengths:
            (seq.fused_acceptance if fused_drafts else seq.acceptance).observe(seq.accepted_lengths[-1],
                                                                               p.num_tokens)
        if seq.truncate_to is not None:
            self.cache.truncate(seq.seq_id, seq.truncate_to)
            seq.truncate_to = None

    def _retire(self) -> list[int]:
        done = [s for s in self.running if s.is_finished]
        for seq in done:
            self.cache.free(seq.seq_id)
            self.running.remove(seq)
            self.finished[seq.seq_id] = seq.result()
        return [s.seq_id for s in done]

    def run(self, requests: list[GenerationRequest],
            on_tokens: TokenCallback | Sequence[TokenCallback | None] | None = None) -> list[GenerationResult]:
        """Run requests to completion (continuing any already queued) and return their results in order.
        ``on_tokens``: one callback for every request, or one per request (a list as long as ``requests``).

        Whatever ends it early (a request refused by ``add_request``, an interrupt, an exception outside any
        one sequence) leaves nothing of these requests behind: not queued, not running, no pages, no result in
        ``finished``; requests queued by others stay."""
        callbacks = list(on_tokens) if isinstance(on_tokens, (list, tuple)) else [on_tokens] * len(requests)
        if len(callbacks) != len(requests):
            raise ValueError(f"{len(callbacks)} token callbacks for {len(requests)} requests")
        ids: list[int] = []
        try:
            for r, callback in zip(requests, callbacks):
                ids.append(self.add_request(r, callback))
            while any(i not in self.finished for i in ids):
                self.step()
        except BaseException:
            self._abort(set(ids))
            raise
        return [self.pop_result(i) for i in ids]

    def _abort(self, ids: set[int]) -> None:
        """Remove every trace of the sequences ``ids``: queue entries, running state, pages, results."""
        self.waiting = deque(s for s in self.waiting if s.seq_id not in ids)
        for seq in self.running:
            if seq.seq_id in ids and not seq.is_finished:
                seq.finish_reason, seq.error = "error", "aborted"
        self._retire()
        for i in ids:
            self.finished.pop(i, None)
            self.cache.free(i)

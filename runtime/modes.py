"""The three decoding modes as small policies over one loop (runtime.engine).

A policy answers two questions for a sequence: which pass to run next (``plan``) and what the pass's output
(its logits, or the engine's decision) means (``consume``). They differ only in block length, attention pattern, whether K/V is kept, and how
tokens are accepted; the loop, batching, paging and counters are shared.

- AR: decode pass over the pending token (causal, kept); the next token from its logits.
- Diffusion: a canvas [seed, MASK x (B-1)] (or all MASK) is denoised by block-bidirectional passes that
  keep nothing; when no mask is left, one causal commit pass writes the block's K/V.
- Spec: a draft pass (block-bidirectional, LoRA on, nothing kept) fills the masks of [seed, MASK x (B-1)];
  a verify pass (causal, kept) scores it; the accepted prefix plus a bonus token is emitted and the cache
  is truncated to what was accepted.

Greedy passes ask the engine to decide (``SeqPass.decide``): a policy then reads ``draft_verify``'s accepted
length and bonus token, or ``confidence_unmask``'s tokens and confidences of the masked rows, instead of logits;
every rule below gives the same tokens either way (docs/kernels.md "Engines that decide"). A verify pass whose
target the thinking budget forces takes logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from trimode.runtime.acceptance import greedy_accept, rejection_accept
from trimode.runtime.passes import PassKind, PassOutput, SeqPass
from trimode.runtime.request import ARConfig, DiffusionConfig, FusedSpecConfig, Mode, SequenceState, SpecConfig
from trimode.runtime.sampling import NonFiniteLogits, select_tokens, target_probs
from trimode.runtime.unmasking import even_schedule, first_finished_eos, reveal, token_confidence


@dataclass
class Block:
    """A block in flight (diffusion canvas or spec draft). ``tokens[0]`` is the pending seed if ``has_seed``."""

    tokens: list[int]
    masked: list[bool]
    has_seed: bool
    phase: PassKind
    step: int = 0
    schedule: list[int] = field(default_factory=list)
    draft_probs: list[torch.Tensor | None] = field(default_factory=list)  # spec sampling: q per position
    from_subblocks: bool = False  # fused spec: the drafts come from the previous step's sub-blocks


class ModePolicy(ABC):
    def __init__(self, mask_token_id: int) -> None:
        self.mask_token_id = mask_token_id

    @abstractmethod
    def plan(self, seq: SequenceState, cache_len: int) -> SeqPass | list[SeqPass] | None:
        """The sequence's next pass (or passes that must run in one forward, the K/V-keeping one first), or
        None if it finished without needing one."""

    @abstractmethod
    def consume(self, seq: SequenceState, p: SeqPass, out: PassOutput) -> None:
        """Apply the output of the sequence's pass: logits [p.num_logits, V], or the engine's decision."""

    def consume_group(self, seq: SequenceState, passes: list[SeqPass], outs: list[PassOutput]) -> None:
        """Apply the outputs of a step that ran several passes for the sequence (a policy whose ``plan`` returns a
        list); single-pass policies never get one."""
        raise NotImplementedError(f"{type(self).__name__} plans one pass per step")

    @staticmethod
    def set_next(seq: SequenceState, out: PassOutput) -> None:
        """After a kept causal pass with one logit row (prefill, decode, commit): what the next token comes from,
        the engine's greedy choice (its ``bonus``) or the logits of the row."""
        seq.pending = None
        if out.logits is None:
            seq.next_token, seq.next_logits = out.bonus, None
        else:
            seq.next_token, seq.next_logits = None, out.logits[-1]

    def take_seed(self, seq: SequenceState) -> bool:
        """Make sure a pending token exists (the engine's greedy choice, else drawn from the last causal logits).
        False if the sequence ended."""
        if seq.pending is None:
            if seq.next_token is not None:
                token = seq.next_token
            else:
                assert seq.next_logits is not None, f"sequence {seq.seq_id} has neither a pending token nor logits"
                token = int(select_tokens(seq.next_logits[None], seq.request.sampling, self.mask_token_id,
                                          seq.generator)[0])
            forced = seq.forced_token(len(seq.generated))  # the thinking budget (AR, and every block's seed)
            if forced is not None:
                token = forced
            seq.next_logits = seq.next_token = None
            seq.emit([token])
            seq.pending = token
        return not seq.is_finished

    @staticmethod
    def decides(seq: SequenceState) -> bool:
        """Whether the sequence's passes can take the engine's decision instead of logits: greedy sampling."""
        return seq.request.sampling.is_greedy

    def block_choices(self, seq: SequenceState, p: SeqPass, out: PassOutput, block: Block,
                      need_confidence: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token and confidence per position of ``block`` (a block-bidirectional pass's output): from the engine's
        decision for the masked rows (``p.decide_rows``; other positions 0), else chosen from the logits
        (``select``; the confidence, ``token_confidence``, only if ``need_confidence``). [len, ] int64 / fp32.
        Raises ``NonFiniteLogits`` for a NaN confidence (logits that were NaN)."""
        if out.logits is None:
            if bool(torch.isnan(out.confidence).any()):  # (a NaN row's argmax means nothing; its confidence is NaN)
                raise NonFiniteLogits("the forward produced NaN logits; no token can be chosen from them")
            rows = torch.tensor(p.decide_rows, dtype=torch.long)
            tokens = torch.zeros(len(block.tokens), dtype=torch.long).index_copy_(0, rows, out.tokens)
            confidence = torch.zeros(len(block.tokens)).index_copy_(0, rows, out.confidence)
            return tokens, confidence
        tokens = self.select(seq, out.logits)
        return tokens, token_confidence(out.logits, tokens) if need_confidence else None

    def new_block(self, seq: SequenceState, length: int) -> Block:
        """[pending, MASK x (length-1)] if a token is pending, else [MASK x length]; a slot whose token is forced
        (the thinking budget's end-of-thinking token, ``SequenceState.forced_token``) holds it unmasked, as the
        reference code places it in the canvas."""
        has_seed = seq.pending is not None
        tokens = ([seq.pending] if has_seed else []) + [self.mask_token_id] * (length - has_seed)
        masked = [False] * has_seed + [True] * (length - has_seed)
        budget = seq.request.max_thinking_tokens
        if budget is not None:
            j = budget - len(seq.generated) + has_seed  # the slot of generated token number `budget`
            if has_seed <= j < length and seq.forced_token(budget) is not None:
                tokens[j], masked[j] = seq.forced_token(budget), False
        return Block(tokens, masked, has_seed, PassKind.DENOISE)

    def select(self, seq: SequenceState, logits: torch.Tensor) -> torch.Tensor:
        return select_tokens(logits, seq.request.sampling, self.mask_token_id, seq.generator)


class ARPolicy(ModePolicy):
    def plan(self, seq: SequenceState, cache_len: int) -> SeqPass | None:
        if not self.take_seed(seq):
            return None
        return SeqPass(seq.seq_id, PassKind.DECODE, (seq.pending,), cache_len, decide=self.decides(seq))

    def consume(self, seq: SequenceState, p: SeqPass, out: PassOutput) -> None:
        self.set_next(seq, out)


class DiffusionPolicy(ModePolicy):
    def plan(self, seq: SequenceState, cache_len: int) -> SeqPass | None:
        cfg: DiffusionConfig = seq.mode
        block: Block | None = seq.policy_state
        if block is None:
            if cfg.causal_context and not self.take_seed(seq):
                return None
            # the block holds the pending token (if any) plus at most num_remaining new tokens
            length = min(cfg.block_length, seq.num_remaining + (seq.pending is not None))
            block = seq.policy_state = self.new_block(seq, length)
            num_masks = sum(block.masked)
            # more steps than masks reveal nothing more (every step reveals >= 1): cap, so max_steps may be huge
            block.schedule = even_schedule(num_masks, min(cfg.steps_for(length), max(num_masks, 1)))
            if num_masks == 0:
                block.phase = PassKind.COMMIT
        decide = self.decides(seq)
        if block.phase is PassKind.COMMIT:
            return SeqPass(seq.seq_id, block.phase, tuple(block.tokens), cache_len, decide=decide)
        return SeqPass(seq.seq_id, block.phase, tuple(block.tokens), cache_len, num_logits=len(block.tokens),
                       decide=decide, decide_rows=_masked_rows(block) if decide else ())

    def consume(self, seq: SequenceState, p: SeqPass, out: PassOutput) -> None:
        block: Block = seq.policy_state
        if p.kind is PassKind.COMMIT:
            self.set_next(seq, out)
            seq.policy_state = None
            return
        cfg: DiffusionConfig = seq.mode
        tokens, confidence = self.block_choices(seq, p, out, block, need_confidence=True)
        masked = torch.tensor(block.masked)
        steps = len(block.schedule)
        chosen = reveal(confidence, masked, cfg.policy, cfg.threshold, block.schedule[block.step],
                        is_last_step=block.step == steps - 1)
        for j in chosen.nonzero().squeeze(-1).tolist():
            block.tokens[j], block.masked[j] = int(tokens[j]), False
        block.step += 1
        seq.revealed_per_step.append(int(chosen.sum()))
        eos = first_finished_eos(block.tokens, block.masked, seq.request.stop_token_ids)
        if eos is None and any(block.masked):
            return
        end = len(block.tokens) if eos is None else eos + 1
        seq.emit(block.tokens[int(block.has_seed):end])
        block.phase = PassKind.COMMIT


class SpecPolicy(ModePolicy):
    def plan(self, seq: SequenceState, cache_len: int) -> SeqPass | None:
        cfg: SpecConfig = seq.mode
        block: Block | None = seq.policy_state
        if block is None:
            if not self.take_seed(seq):
                return None
            block = seq.policy_state = self.new_block(seq, min(cfg.block_length, seq.num_remaining))
            block.phase = PassKind.DRAFT if any(block.masked) else PassKind.VERIFY
            block.draft_probs = [None] * len(block.tokens)
        if block.phase is PassKind.DRAFT:
            return self.draft_pass(seq, block, cache_len, cfg.use_lora)
        return self.verify_pass(seq, block, cache_len)

    def draft_pass(self, seq: SequenceState, block: Block, cache_len: int, use_lora: bool) -> SeqPass:
        """The draft pass of ``block`` (block-bidirectional, LoRA if ``use_lora``); a greedy request's asks for the
        engine's tokens of the masked rows."""
        decide = self.decides(seq)
        return SeqPass(seq.seq_id, PassKind.DRAFT, tuple(block.tokens), cache_len, num_logits=len(block.tokens),
                       use_lora=use_lora, decide=decide, decide_rows=_masked_rows(block) if decide else ())

    def verify_pass(self, seq: SequenceState, block: Block, cache_len: int) -> SeqPass:
        """The verify pass of ``block``; it takes the engine's decision unless sampling or the thinking budget
        forcing one of its targets needs the logits."""
        decide = self.decides(seq) and self._forced_target(seq, block)[1] is None
        return SeqPass(seq.seq_id, PassKind.VERIFY, tuple(block.tokens), cache_len, num_logits=len(block.tokens),
                       decide=decide)

    def consume(self, seq: SequenceState, p: SeqPass, out: PassOutput) -> None:
        (self._consume_draft if p.kind is PassKind.DRAFT else self._consume_verify)(seq, p, out)

    def _consume_draft(self, seq: SequenceState, p: SeqPass, out: PassOutput) -> None:
        threshold = getattr(seq.mode, "threshold", 0.0)  # fused spec: always 0
        block: Block = seq.policy_state
        tokens, confidence = self.block_choices(seq, p, out, block, need_confidence=threshold > 0)
        masked = torch.tensor(block.masked)
        if threshold > 0:
            chosen = reveal(confidence, masked, "threshold", threshold, 1, False)
        else:
            chosen = masked
        sampling = seq.request.sampling
        probs = None if sampling.is_greedy else target_probs(out.logits, sampling, self.mask_token_id)
        for j in chosen.nonzero().squeeze(-1).tolist():
            block.tokens[j], block.masked[j] = int(tokens[j]), False
            if probs is not None:
                block.draft_probs[j] = probs[j]
        if not any(block.masked):
            block.phase = PassKind.VERIFY

    @staticmethod
    def _forced_target(seq: SequenceState, block: Block) -> tuple[int | None, int | None]:
        """(k, token) if the thinking budget forces verify target k of ``block``, else (k or None, None)."""
        # verify logit k scores generated token number g + k (the seed is number g - 1); the thinking budget may
        # force one of them, given that the drafts before it are what gets emitted ahead of it
        g = len(seq.generated)
        k = None if seq.request.max_thinking_tokens is None else seq.request.max_thinking_tokens - g
        forced = seq.forced_token(g + k, block.tokens[1:][:k]) if k is not None and 0 <= k < len(block.tokens) \
            else None
        return k, forced

    def _consume_verify(self, seq: SequenceState, p: SeqPass, out: PassOutput) -> None:
        block: Block = seq.policy_state
        draft = block.tokens[1:]
        sampling = seq.request.sampling
        k, forced = self._forced_target(seq, block)
        logits = out.logits
        if logits is None:  # the engine's draft_verify (greedy, no forced target: verify_pass)
            emitted = draft[:out.accepted - 1] + [out.bonus]
        elif sampling.is_greedy:
            target = self.select(seq, logits).tolist()
            if forced is not None:
                target[k] = forced
            emitted = target[:greedy_accept(draft, target)]
        else:
            p_target = target_probs(logits, sampling, self.mask_token_id)
            if forced is not None:  # the target distribution of a forced token is that token
                p_target[k] = torch.nn.functional.one_hot(torch.tensor(forced), p_target.shape[-1]).to(p_target)
            q = torch.stack([_one_hot_like(t, p_target) if q is None else q
                             for t, q in zip(draft, block.draft_probs[1:])]) if draft else p_target[:0]
            emitted = rejection_accept(draft, q, p_target, seq.generator)
        n = len(emitted)
        seq.accepted_lengths.append(n)
        seq.truncate_to = p.start_pos + n  # keeps the seed and the n-1 accepted drafts
        seq.emit(emitted)
        seq.pending, seq.next_logits, seq.policy_state = emitted[-1], None, None


@dataclass
class FusedDrafts:
    """Fused spec's hand-over to its next step: the drafts for after ``seed`` and the draft distribution of each
    (sampling only; None where greedy)."""

    seed: int
    tokens: list[int]
    probs: list[torch.Tensor | None]


class FusedSpecPolicy(SpecPolicy):
    """Fused self-speculation (``FusedSpecConfig``): a step is one forward of the chain [seed, drafts] as a
    verify pass (causal, kept) and of sub-block passes: sub-block i = [MASK x B'] at positions L+i+1 ..
    L+i+B', a draft pass (LoRA on, nothing kept) whose context is the prefix plus chain tokens 0..i, which the
    executor writes to the pool before the sub-blocks attend (docs/kernels.md, "Fused self-speculation pass").
    Acceptance is linear spec's (greedy match or rejection sampling, the thinking budget applied to the targets);
    after c accepted tokens the next seed is the bonus token and the next drafts are sub-block c-1's tokens 1..
    (its token 0 is the bonus's position). Without drafts (the first step, or more accepted than sub-blocks
    exist) one linear draft pass drafts the block first. Source: NLD paper, quadratic self-speculation
    (spec/model.md section 2)."""

    def plan(self, seq: SequenceState, cache_len: int) -> SeqPass | list[SeqPass] | None:
        cfg: FusedSpecConfig = seq.mode
        block: Block | None = seq.policy_state
        if block is None:
            if not self.take_seed(seq):
                return None
            carry = seq.carry if isinstance(seq.carry, FusedDrafts) and seq.carry.seed == seq.pending else None
            seq.carry = None
            limit = max(min(cfg.block_length if carry is None else cfg.next_block_length, seq.num_remaining), 1)
            if carry is None:  # no drafts: a linear draft pass first
                block = seq.policy_state = self.new_block(seq, limit)
                block.phase = PassKind.DRAFT if any(block.masked) else PassKind.VERIFY
                block.draft_probs = [None] * len(block.tokens)
            else:
                n = min(limit, 1 + len(carry.tokens))
                block = seq.policy_state = Block([seq.pending] + carry.tokens[:n - 1], [False] * n, True,
                                                 PassKind.VERIFY, draft_probs=[None] + carry.probs[:n - 1],
                                                 from_subblocks=True)
        if block.phase is PassKind.DRAFT:
            return self.draft_pass(seq, block, cache_len, cfg.use_lora)
        chain = self.verify_pass(seq, block, cache_len)
        decide = self.decides(seq)
        end = len(seq.request.prompt_ids) + seq.request.max_new_tokens  # no position past the request's last
        subs = []
        for i in range(min(cfg.num_subblocks, len(block.tokens))):
            start = cache_len + i + 1
            length = min(cfg.next_block_length, end - start)
            if length < 2:  # nothing to draft beyond the bonus token
                break
            subs.append(SeqPass(seq.seq_id, PassKind.DRAFT, (self.mask_token_id,) * length, start, num_logits=length,
                                use_lora=cfg.use_lora, decide=decide,
                                decide_rows=tuple(range(1, length)) if decide else ()))  # row 0: the bonus's
        return [chain, *subs]

    def consume(self, seq: SequenceState, p: SeqPass, out: PassOutput) -> None:
        if p.kind is PassKind.DRAFT:  # the linear draft pass
            self._consume_draft(seq, p, out)
            return
        self.consume_group(seq, [p], [out])

    def consume_group(self, seq: SequenceState, passes: list[SeqPass], outs: list[PassOutput]) -> None:
        """The chain's verify output (``passes[0]``) and each sub-block's (logits [B'_i, V], or the engine's tokens
        of rows 1..)."""
        had_subblocks = len(passes) - 1
        cut = had_subblocks < min(seq.mode.num_subblocks, passes[0].num_tokens)  # the request's end cut some
        self._consume_verify(seq, passes[0], outs[0])  # emits, sets truncate_to, pending = the bonus token
        accepted = seq.accepted_lengths[-1]
        if seq.is_finished:
            return
        if accepted - 1 < had_subblocks:
            sub = outs[accepted]  # sub-block accepted-1: its position 0 is the bonus token's
            tokens = sub.tokens if sub.logits is None else self.select(seq, sub.logits[1:])
            sampling = seq.request.sampling
            probs = [None] * len(tokens) if sampling.is_greedy else \
                list(target_probs(sub.logits[1:], sampling, self.mask_token_id))
            seq.carry = FusedDrafts(seq.pending, [int(t) for t in tokens], probs)
        elif not cut:
            seq.fused_fallbacks += 1  # more accepted than drafted ahead: the next step drafts linearly


def _masked_rows(block: Block) -> tuple[int, ...]:
    return tuple(j for j, m in enumerate(block.masked) if m)


def _one_hot_like(token: int, like: torch.Tensor) -> torch.Tensor:
    """The draft distribution of a token placed, not sampled (a forced slot): all mass on it. [V], like's dtype."""
    return torch.nn.functional.one_hot(torch.tensor(token), like.shape[-1]).to(like)


def make_policies(mask_token_id: int) -> dict[Mode, ModePolicy]:
    return {Mode.AR: ARPolicy(mask_token_id), Mode.DIFFUSION: DiffusionPolicy(mask_token_id),
            Mode.FUSED_SPEC: FusedSpecPolicy(mask_token_id),
            Mode.SPEC: SpecPolicy(mask_token_id)}


__all__ = ["ARConfig", "DiffusionConfig", "SpecConfig", "FusedSpecConfig", "ModePolicy", "make_policies"]

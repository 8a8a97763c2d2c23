"""Requests, their decoding-mode settings, their results, and the per-sequence state the loop updates.

A mode is data: ``ARConfig``, ``DiffusionConfig`` or ``SpecConfig`` (each frozen and validated once).
A request may switch mode mid-generation (``switches``): the new mode takes over at the first step boundary
after the given number of generated tokens, on the same KV cache.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Sequence, Union

import torch

from trimode.runtime.passes import PassKind
from trimode.runtime.sampling import SamplingParams
from trimode.runtime.unmasking import POLICIES


class Mode(str, Enum):
    AR = "ar"
    DIFFUSION = "diffusion"
    SPEC = "spec"
    FUSED_SPEC = "fused_spec"
    AUTO = "auto"


class RequestError(ValueError):
    """A request with invalid parameters; the message names the parameter and what is allowed."""


def _check_block_length(block_length: int) -> None:
    if not isinstance(block_length, int) or isinstance(block_length, bool) or block_length < 1:
        raise RequestError(f"block_length must be an integer >= 1, got {block_length!r}")


@dataclass(frozen=True)
class ARConfig:
    mode = Mode.AR


@dataclass(frozen=True)
class DiffusionConfig:
    """Block diffusion. ``threshold`` is used by the ``threshold`` policy only; ``max_steps`` defaults to
    ``block_length``; ``causal_context`` seeds each block's first slot with the AR token."""

    block_length: int = 32
    policy: str = "threshold"
    threshold: float | None = 0.9
    max_steps: int | None = None
    causal_context: bool = True
    mode = Mode.DIFFUSION

    def __post_init__(self) -> None:
        _check_block_length(self.block_length)
        if self.policy not in POLICIES:
            raise RequestError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy == "threshold":
            if self.threshold is None or math.isnan(self.threshold) or not 0 <= self.threshold <= 1:
                raise RequestError(f"threshold must be in [0, 1] for policy 'threshold', got {self.threshold!r}")
        elif self.threshold is not None:
            raise RequestError(f"threshold applies only to policy='threshold', not {self.policy!r}; leave it unset")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise RequestError(f"max_steps must be an integer >= 1, got {self.max_steps!r}")

    def steps_for(self, block_length: int) -> int:
        return self.max_steps or block_length


@dataclass(frozen=True)
class SpecConfig:
    """Linear self-speculation: draft a block (bidirectional, LoRA on), verify it causally, keep the
    accepted prefix. ``threshold`` 0 fills every mask in one draft pass; > 0 repeats draft passes."""

    block_length: int = 32
    threshold: float = 0.0
    use_lora: bool = True
    mode = Mode.SPEC

    def __post_init__(self) -> None:
        _check_block_length(self.block_length)
        if self.threshold is None or math.isnan(self.threshold) or not 0 <= self.threshold <= 1:
            raise RequestError(f"threshold must be in [0, 1], got {self.threshold!r}")


@dataclass(frozen=True)
class AutoConfig:
    """Mode ``auto`` (runtime.scheduling): at each step boundary the engine runs the sequence as AR, as linear
    self-speculation (threshold 0, ``use_lora``) or as fused self-speculation (``fused_subblocks`` sub-blocks)
    with one of ``block_lengths``, whichever it expects to give the batch the most tokens per second. Output as
    AR's: greedy identical, sampled with the same distribution."""

    block_lengths: tuple[int, ...] = (4, 8, 16, 32)
    use_lora: bool = True
    fused_subblocks: int = 4   # fused spec is an option too, with this many sub-blocks of B (0: not an option)
    mode = Mode.AUTO

    def __post_init__(self) -> None:
        if not self.block_lengths or any(not isinstance(b, int) or isinstance(b, bool) or b < 2
                                         for b in self.block_lengths):
            raise RequestError(f"auto block_lengths must be integers >= 2, got {self.block_lengths!r}")
        if not isinstance(self.fused_subblocks, int) or self.fused_subblocks < 0:
            raise RequestError(f"auto fused_subblocks must be an integer >= 0, got {self.fused_subblocks!r}")

    @property
    def block_length(self) -> int:
        """The longest block it may use (what an engine's passes must hold)."""
        return max(self.block_lengths)

    @staticmethod
    def up_to(block_length: int, use_lora: bool = True) -> "AutoConfig":
        """Powers of two from 4 below ``block_length``, and ``block_length`` itself (2 when it is 2 or 3)."""
        _check_block_length(block_length)
        if block_length < 2:
            raise RequestError("mode auto needs block_length >= 2 (a block of 1 is AR)")
        lengths = {b for b in (4, 8, 16, 32, 64, 128) if b < block_length} | {block_length}
        return AutoConfig(tuple(sorted(lengths)), use_lora)


# fused_spec's defaults, from tokens per forward on tiny-kjv at block 16 (docs/performance.md): more than 4
# sub-blocks add nothing (more than 4 tokens are rarely accepted), and sub-blocks of B/2 give what B does
FUSED_SUBBLOCKS = 4


@dataclass(frozen=True)
class FusedSpecConfig:
    """Fused self-speculation (the NLD paper's quadratic self-speculation): one forward per step verifies the
    draft chain [seed, d_1 .. d_(n-1)] (causal, K/V kept: its logits verify the drafts as a verify pass does)
    and drafts the next block in ``num_subblocks`` (K) sub-blocks of ``subblock_length`` (B') masks, sub-block i
    placed after chain token i and seeing the prefix up to it (LoRA on, nothing kept): after c tokens are
    accepted, sub-block c-1 holds the next drafts, with no draft pass of its own (defaults: K = 4 sub-blocks of
    B' = ``block_length // 2``; the first chain has ``block_length`` tokens, later ones B'). When
    more tokens are accepted than there are sub-blocks, or at the start, one linear draft pass drafts instead
    (a fallback). Threshold 0 (every mask filled at once), so sampled output is exact by rejection sampling.
    Attention: docs/kernels.md, "Fused self-speculation pass"."""

    block_length: int = 32
    num_subblocks: int | None = None      # None: min(FUSED_SUBBLOCKS, block_length)
    subblock_length: int | None = None    # None: block_length // 2 (at least 2)
    use_lora: bool = True
    mode = Mode.FUSED_SPEC

    def __post_init__(self) -> None:
        _check_block_length(self.block_length)
        if self.block_length < 2:
            raise RequestError("fused_spec needs block_length >= 2 (a chain of the seed and at least one draft)")
        if self.num_subblocks is None:
            object.__setattr__(self, "num_subblocks", min(FUSED_SUBBLOCKS, self.block_length))
        if not isinstance(self.num_subblocks, int) or isinstance(self.num_subblocks, bool) \
                or not 1 <= self.num_subblocks <= self.block_length:
            raise RequestError(f"num_subblocks must be an integer in 1 .. block_length ({self.block_length}), "
                               f"got {self.num_subblocks!r}")
        if self.subblock_length is not None and (
                not isinstance(self.subblock_length, int) or isinstance(self.subblock_length, bool)
                or not 2 <= self.subblock_length <= self.block_length):
            raise RequestError(f"subblock_length must be an integer in 2 .. block_length ({self.block_length}): "
                               f"a sub-block holds the bonus token's slot and at least one draft, got "
                               f"{self.subblock_length!r}")

    @property
    def next_block_length(self) -> int:
        """B': the sub-blocks' length, hence every later chain's (seed + B' - 1 drafts)."""
        return self.subblock_length or max(2, self.block_length // 2)

    @property
    def max_pass_tokens(self) -> tuple[int, int]:
        """(causal tokens, block-bidirectional tokens) of one fused step: the chain and the sub-blocks."""
        return self.block_length, self.num_subblocks * self.next_block_length


ModeConfig = Union[ARConfig, DiffusionConfig, SpecConfig, FusedSpecConfig, AutoConfig]

DIFFUSION_THRESHOLD = 0.9  # the model card's confidence threshold for block diffusion
SPEC_THRESHOLD = 0.0       # one draft pass per block (exact rejection sampling needs it)


def mode_config(mode: str | Mode, block_size: int, block_length: int | None = None, threshold: float | None = None,
                policy: str = "threshold", max_steps: int | None = None, use_lora: bool = True,
                causal_context: bool = True, num_subblocks: int | None = None,
                subblock_length: int | None = None) -> ModeConfig:
    """The mode config of a request with the project's defaults filled in: the one factory behind the API, the
    CLI and the Triton model. ``block_length`` None means the checkpoint's ``block_size`` (for ``auto``: the
    longest block it may choose); ``threshold`` None
    means 0.9 for diffusion's threshold policy (unset for the others) and 0.0 for spec. Raises
    ``RequestError`` naming the bad value (unknown mode, bad block length, threshold, policy, steps)."""
    try:
        mode = Mode(mode)
    except ValueError:
        raise RequestError(f"unknown mode {mode!r}: expected one of {', '.join(m.value for m in Mode)}") from None
    if mode is Mode.AR:
        return ARConfig()
    block = block_size if block_length is None else block_length
    if mode is Mode.AUTO:
        return AutoConfig.up_to(block, use_lora)
    if mode is Mode.FUSED_SPEC:
        return FusedSpecConfig(block, num_subblocks, subblock_length, use_lora)
    if mode is Mode.DIFFUSION:
        if policy == "threshold" and threshold is None:
            threshold = DIFFUSION_THRESHOLD
        return DiffusionConfig(block, policy, threshold, max_steps, causal_context)
    return SpecConfig(block, SPEC_THRESHOLD if threshold is None else threshold, use_lora)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    mode: ModeConfig = ARConfig()
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: frozenset[int] = frozenset()   # EOS ids and other stop tokens (emitted, then stop)
    switches: tuple[tuple[int, ModeConfig], ...] = ()  # (after this many generated tokens, switch to mode)
    max_thinking_tokens: int | None = None  # thinking budget: see SequenceState.forced_token
    end_think_token_id: int | None = None   # the end-of-thinking token ("</think>") forced at the budget
    stop: tuple[str, ...] = ()              # stop strings: matched on the decoded text by the front end
                                            # (runtime.stopping); the loop sees token ids only

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise RequestError("the prompt is empty: at least one token is needed")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        spec = [m for m in (self.mode, *(m for _, m in self.switches)) if isinstance(m, SpecConfig)]  # fused: 0
        if not self.sampling.is_greedy and any(m.threshold > 0 for m in spec):
            raise RequestError("spec decoding with temperature > 0 needs threshold 0: rejection sampling is "
                               "exact only for drafts filled in one pass")
        if list(self.switches) != sorted(self.switches, key=lambda s: s[0]):
            raise RequestError("switches must be ordered by their token counts")
        if self.max_thinking_tokens is not None:
            if not isinstance(self.max_thinking_tokens, int) or isinstance(self.max_thinking_tokens, bool) \
                    or self.max_thinking_tokens < 0:
                raise RequestError(f"max_thinking_tokens must be an integer >= 0, got {self.max_thinking_tokens!r}")
            if self.end_think_token_id is None:
                raise RequestError("max_thinking_tokens needs the end-of-thinking token id (end_think_token_id): "
                                   "this model's tokenizer has no '</think>' token")
        if not isinstance(self.stop, tuple) or not all(isinstance(t, str) and t for t in self.stop):
            raise RequestError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        if self.end_think_token_id is not None and (not isinstance(self.end_think_token_id, int)
                                                    or isinstance(self.end_think_token_id, bool)
                                                    or self.end_think_token_id < 0):
            raise RequestError(f"end_think_token_id must be a token id >= 0, got {self.end_think_token_id!r}")


@dataclass
class GenerationResult:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None          # "stop" (EOS / stop token), "length", "error", "cancelled"
    forwards: dict[str, int]
    accepted_lengths: list[int]        # spec: tokens emitted per verify (accepted drafts + 1)
    revealed_per_step: list[int]       # diffusion: tokens revealed per denoising pass
    wall_time_s: float
    error: str | None = None
    text: str | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    auto_choices: dict[str, int] = field(default_factory=dict)  # mode auto: steps in "ar", cycles in "spec:B"
    fused_fallbacks: int = 0           # fused spec: linear draft passes taken because no sub-block covered it

    @property
    def num_forwards(self) -> int:
        return sum(self.forwards.values())

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward, counting every forward the request took part in (prefill too)."""
        return len(self.token_ids) / max(self.num_forwards, 1)

    @property
    def mean_accepted_length(self) -> float | None:
        return sum(self.accepted_lengths) / len(self.accepted_lengths) if self.accepted_lengths else None

    def counters(self) -> dict:
        return {"forwards": dict(self.forwards), "num_forwards": self.num_forwards,
                "num_tokens": len(self.token_ids), "tokens_per_forward": round(self.tokens_per_forward, 4),
                "mean_accepted_length": self.mean_accepted_length, "accepted_lengths": list(self.accepted_lengths),
                "wall_time_s": round(self.wall_time_s, 4), "finish_reason": self.finish_reason,
                **({"auto_choices": dict(self.auto_choices)} if self.auto_choices else {}),
                **({"fused_fallbacks": self.fused_fallbacks} if self.fused_fallbacks else {})}


# (request_id, new token ids) -> None / True: go on; False: stop after these; int k: stop, keeping the first k
TokenCallback = Callable[[int, list[int]], "bool | int | None"]


@dataclass
class SequenceState:
    """What the decoding loop knows about one running request.

    Invariant between steps: the cache holds prompt + generated, except the ``pending`` token (the last
    generated token, whose K/V is not yet computed) when it is set. When ``pending`` is None, ``next_logits``
    holds the causal logits for the token after the cache (from the last kept causal pass), or ``next_token`` the
    engine's greedy choice of it (a pass that decided: runtime.passes.SeqPass.decide).
    """

    seq_id: int
    request: GenerationRequest
    mode: ModeConfig
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    pending: int | None = None
    next_logits: torch.Tensor | None = None
    next_token: int | None = None
    is_prefilled: bool = False
    finish_reason: str | None = None
    error: str | None = None
    exception: BaseException | None = None
    forwards: dict[str, int] = field(default_factory=lambda: {k.value: 0 for k in PassKind})
    accepted_lengths: list[int] = field(default_factory=list)
    revealed_per_step: list[int] = field(default_factory=list)
    policy_state: object | None = None   # owned by the current mode's policy; None at a step boundary
    truncate_to: int | None = None       # set by a policy: roll the cache back to this length after the step
    start_time: float = field(default_factory=time.perf_counter)
    on_tokens: TokenCallback | None = None
    carry: object | None = None          # what a policy hands its next step across a boundary (fused spec's
                                         # next drafts); dropped when the mode changes
    fused_fallbacks: int = 0             # fused spec: linear draft passes after more was accepted than drafted
    auto: AutoConfig | None = None       # mode auto is selected: ``mode`` is what it chose for this cycle
    acceptance: object | None = None     # mode auto: runtime.scheduling.AcceptanceEstimate of linear drafts
    fused_acceptance: object | None = None  # mode auto: that of fused spec's sub-block drafts
    auto_choices: dict[str, int] = field(default_factory=dict)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_remaining(self) -> int:
        return self.request.max_new_tokens - len(self.generated)

    def forced_token(self, index: int, before: Sequence[int] = ()) -> int | None:
        """The token generated token number ``index`` (0-based) must be, or None if it is free.

        The thinking budget (spec/model.md section 3, every decoding function of the reference code): when the
        first ``max_thinking_tokens`` generated tokens hold no end-of-thinking token, the next one is forced to
        it, so a thinking section never runs past the budget. ``before``: tokens between ``generated`` and
        ``index`` that a multi-token step would emit first (a spec step's drafts, a diffusion canvas)."""
        r = self.request
        if r.max_thinking_tokens is None or index != r.max_thinking_tokens:
            return None
        if r.end_think_token_id in before or r.end_think_token_id in self.generated:
            return None
        return r.end_think_token_id

    def emit(self, tokens: list[int]) -> None:
        """Append generated tokens, cutting after the first stop token and at max_new_tokens, and hand them to
        ``on_tokens``. The callback may end the sequence (finish reason "stop": e.g. a stop string matched on the
        decoded text, runtime.stopping) by returning False (these tokens kept) or an int k (only the first k of
        them kept: the output ends where the callback's own output ended)."""
        assert not self.is_finished
        out = []
        for t in tokens[:self.num_remaining]:
            out.append(t)
            if t in self.request.stop_token_ids:
                self.finish_reason = "stop"
                break
        self.generated.extend(out)
        if self.finish_reason is None and self.num_remaining == 0:
            self.finish_reason = "length"
        if out and self.on_tokens is not None:
            verdict = self.on_tokens(self.seq_id, out)
            if verdict is False or (isinstance(verdict, int) and not isinstance(verdict, bool)):
                if verdict is not False:
                    del self.generated[len(self.generated) - len(out) + max(0, min(verdict, len(out))):]
                self.finish_reason = "stop"

    def result(self) -> GenerationResult:
        return GenerationResult(self.seq_id, list(self.request.prompt_ids), list(self.generated), self.finish_reason,
                                dict(self.forwards), list(self.accepted_lengths), list(self.revealed_per_step),
                                time.perf_counter() - self.start_time, self.error,
                                exception=self.exception, auto_choices=dict(self.auto_choices),
                                fused_fallbacks=self.fused_fallbacks)

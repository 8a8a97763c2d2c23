"""Token selection: greedy and temperature / top-k / top-p sampling, as pure tensor functions.

The mask token is never a valid output (excluded from every selection, as SGLang and vLLM do).

Every finite parameter the validator accepts gives a valid distribution: logits are shifted by their row maximum
before the division by T (so they lie in [-inf, 0], with 0 at the maximum: nothing can overflow to +inf or
become inf - inf), and T is clamped to float32's normal range, so T = 1e-38 (or any T below float32's smallest
normal) is the T -> 0 limit (uniform over the tied maxima: greedy but for exact ties) and T = 1e38 the uniform
limit. Rows whose logits are not finite (NaN, +inf: a broken forward) raise ``NonFiniteLogits``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """Invalid sampling parameters."""


class NonFiniteLogits(RuntimeError):
    """A forward produced NaN or +inf logits for a sequence: no distribution can be drawn from them."""

# T is clamped to [_T_MIN, _T_MAX] (float32's normal range): 1/T stays finite and T itself representable
_T_MIN = torch.finfo(torch.float32).tiny
_T_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0        # 0 = no top-k filter
    top_p: float = 1.0    # 1 = no nucleus filter
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or math.isnan(t) or math.isinf(t) or t < 0:
            raise SamplingError(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or math.isnan(p) or not 0 < p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 64):
            raise SamplingError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        if self.is_greedy:
            return None
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return gen


def _without_mask(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    logits = logits.float().clone()
    logits[..., mask_token_id] = -math.inf
    return logits


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(logits - max) / T in fp32, [..., V] -> [..., V] with values in [-inf, 0] (0 at each row's maxima).

    The shift leaves softmax unchanged and makes the division unable to overflow towards +inf; T is clamped to
    float32's normal range (see the module docstring). Raises ``NonFiniteLogits`` for rows holding NaN or
    +inf, or holding no finite logit at all."""
    logits = logits.float()
    top = logits.amax(-1, keepdim=True)
    if not bool(torch.isfinite(top).all()):  # amax propagates NaN
        raise NonFiniteLogits("the forward produced NaN or infinite logits (or none finite); "
                              "no token can be sampled from them")
    t = min(max(float(temperature), _T_MIN), _T_MAX)
    return (logits - top) / t


def target_probs(logits: torch.Tensor, params: SamplingParams, mask_token_id: int) -> torch.Tensor:
    """The distribution tokens are drawn from: softmax(logits / T) after top-k and top-p filtering. [..., V] fp32.

    Well defined for every accepted T > 0 and top_p in (0, 1] (see the module docstring); raises
    ``NonFiniteLogits`` when the logits are not finite."""
    logits = scaled_logits(_without_mask(logits, mask_token_id), params.temperature)
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop[..., 0] = False  # the most likely token always stays (a top_p below float32's range reads as 0)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of probs [N, V] -> [N] (CPU generator, so draws do not depend on the device)."""
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)


def select_tokens(logits: torch.Tensor, params: SamplingParams, mask_token_id: int,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax (T = 0) or a sample from ``target_probs`` for each row of logits [N, V]."""
    if params.is_greedy:
        # max, not argmax: the same first maximal index, in a third of the time on CPU; it propagates NaN, so a
        # row holding one yields NaN and checking the maxima suffices. The mask token is excluded only where it
        # won (a copy of the logits per call would cost more than the choice itself)
        values, tokens = logits.max(-1)
        if bool((tokens == mask_token_id).any()):
            values, tokens = _without_mask(logits, mask_token_id).max(-1)
        if bool(torch.isnan(values).any()):
            raise NonFiniteLogits("the forward produced NaN logits; no token can be chosen from them")
        return tokens
    return sample_from(target_probs(logits, params, mask_token_id), generator)

"""Token selection: greedy and temperature / top-k / top-p sampling, as pure tensor functions.

The mask token is never a valid output (excluded from every selection, as SGLang and vLLM do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """Invalid sampling parameters."""


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
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise SamplingError(f"seed must be a non-negative integer, got {self.seed!r}")

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


def target_probs(logits: torch.Tensor, params: SamplingParams, mask_token_id: int) -> torch.Tensor:
    """The distribution tokens are drawn from: softmax(logits / T) after top-k and top-p filtering. [..., V]"""
    logits = _without_mask(logits, mask_token_id) / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
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
        return _without_mask(logits, mask_token_id).argmax(-1)
    return sample_from(target_probs(logits, params, mask_token_id), generator)

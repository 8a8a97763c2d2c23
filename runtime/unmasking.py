"""Which masked positions of a diffusion canvas to reveal after a denoising pass: pure functions.

Policies (a closed set): ``threshold`` (reveal every masked position whose confidence is >= tau, always at
least the most confident one), ``topk`` (reveal k_s per step, with the block's masks split evenly over the
allowed steps), ``leftmost`` (reveal the k_s leftmost masked positions). On the last allowed step every
remaining mask is revealed. Confidence is the untempered softmax probability of the chosen token.
Confidence ties are broken by position (leftmost first).
"""

from __future__ import annotations

import torch

POLICIES = ("threshold", "topk", "leftmost")


def token_confidence(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """softmax(raw logits)[token] for each row: logits [n, V], tokens [n] -> [n] fp32."""
    return logits.float().softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def even_schedule(num_masks: int, num_steps: int) -> list[int]:
    """How many tokens to reveal at each step: an even split, the remainder to the earliest steps."""
    base, extra = divmod(num_masks, num_steps)
    return [base + (1 if s < extra else 0) for s in range(num_steps)]


def reveal(confidence: torch.Tensor, is_masked: torch.Tensor, policy: str, threshold: float | None,
           num_to_reveal: int, is_last_step: bool) -> torch.Tensor:
    """Bool [n]: the masked positions to reveal now. ``num_to_reveal`` is k_s (topk / leftmost).

    A block holds at most a few dozen positions, so the rule runs on host lists (one copy each way) rather than
    as a dozen tensor ops on n-element tensors, which cost more than the forward of a small model."""
    assert policy in POLICIES, policy
    masked = [i for i, m in enumerate(is_masked.tolist()) if m]
    out = [False] * is_masked.shape[0]
    if masked and (is_last_step or policy == "leftmost"):
        for i in masked if is_last_step else masked[:max(num_to_reveal, 1)]:
            out[i] = True
    elif masked:
        conf = confidence.tolist()
        order = sorted(masked, key=lambda i: -conf[i])  # most confident first, leftmost among equals (stable)
        if policy == "topk":
            chosen = order[:max(num_to_reveal, 1)]
        else:  # threshold: everything >= tau, and the best one even if it is below tau
            chosen = [i for i in masked if conf[i] >= threshold] + order[:1]
        for i in chosen:
            out[i] = True
    return torch.tensor(out, dtype=torch.bool)


def first_finished_eos(canvas: list[int], is_masked: list[bool], eos_ids: frozenset[int]) -> int | None:
    """Index of the first EOS with no mask before it (the block can stop there), else None."""
    for j, (tok, masked) in enumerate(zip(canvas, is_masked)):
        if masked:
            return None
        if tok in eos_ids:
            return j
    return None

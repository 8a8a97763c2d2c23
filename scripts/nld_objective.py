"""The Nemotron-Labs-Diffusion training objective and draft metrics as pure tensor functions.

Everything runs through the runtime's own ``NLDModel.forward_dense`` (one model, one head). Layout of the
joint pass (spec/model.md §2, §4): the input is ``[x_t | x_0]`` (length 2L), both halves at positions
0..L-1, under ``block_diff_mask``. The clean half's logits are the AR logits (logit i predicts token i+1);
the noisy half's logits are the diffusion logits (logit i predicts token i, no shift).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trimode.runtime.model.network import NLDModel, causal_mask

# ---- attention masks ------------------------------------------------------------------------------------


def _halves(noisy_noisy: torch.Tensor, noisy_clean: torch.Tensor, clean_clean: torch.Tensor) -> torch.Tensor:
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)
    bottom = torch.cat([torch.zeros_like(clean_clean), clean_clean], dim=1)  # clean never sees noisy
    return torch.cat([top, bottom], dim=0)


def block_diff_mask(length: int, block_size: int) -> torch.Tensor:
    """[2L, 2L] bool, query row may see key column, over ``[x_t | x_0]`` (NLD ``block_diff``).

    noisy->noisy: same block, bidirectional; noisy block b -> clean tokens of blocks < b (strictly earlier);
    clean->clean: causal; clean->noisy: never. This is also exactly the inference draft pass of every block
    at once: the block sees its committed (clean, causal) prefix and itself bidirectionally.
    """
    block = torch.arange(length) // block_size
    same_block = block[:, None] == block[None, :]
    earlier_block = block[None, :] < block[:, None]
    return _halves(same_block, earlier_block, causal_mask(length))


def block_causal_mask(length: int, block_size: int) -> torch.Tensor:
    """Like ``block_diff_mask`` but causal inside each noisy block: AR decoding of every block from its seed."""
    block = torch.arange(length) // block_size
    same_block_causal = (block[:, None] == block[None, :]) & causal_mask(length)
    earlier_block = block[None, :] < block[:, None]
    return _halves(same_block_causal, earlier_block, causal_mask(length))


def doubled_positions(batch: int, length: int) -> torch.Tensor:
    """[B, 2L]: positions 0..L-1 on the noisy half and again on the clean half."""
    return torch.arange(length).repeat(2)[None].expand(batch, 2 * length)


def is_seed_slot(length: int, block_size: int) -> torch.Tensor:
    """[L] bool: slot 0 of each block (the AR seed at inference)."""
    return torch.arange(length) % block_size == 0


# ---- losses -------------------------------------------------------------------------------------------


def ar_loss(model: NLDModel, x0: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal forward over x0 [B, L] (the AR-only warm-up objective)."""
    batch, length = x0.shape
    logits = model.forward_dense(x0, torch.arange(length)[None].expand(batch, length), causal_mask(length))
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x0[:, 1:].flatten())


def add_noise(x0: torch.Tensor, mask_id: int, block_size: int, gen: torch.Generator, eps: float = 1e-3,
              keep_seed_prob: float = 0.0, t: torch.Tensor | None = None):
    """NLD forward process: per sequence t ~ U(0,1), p = (1-eps) t + eps, each token masked with prob p.

    With ``keep_seed_prob`` > 0 each block's slot 0 is left clean with that probability (it is the AR seed
    at inference); such slots are not eligible for masking. Returns (x_t, is_masked, p [B,1], is_eligible).
    """
    batch, length = x0.shape
    if t is None:
        t = torch.rand(batch, 1, generator=gen)
    p = (1 - eps) * t + eps
    is_masked = torch.rand(batch, length, generator=gen) < p
    is_eligible = torch.ones_like(is_masked)
    if keep_seed_prob > 0:
        keep = is_seed_slot(length, block_size) & (torch.rand(batch, length, generator=gen) < keep_seed_prob)
        is_eligible &= ~keep
        is_masked &= ~keep
    return torch.where(is_masked, mask_id, x0), is_masked, p, is_eligible


def joint_loss(model: NLDModel, x0: torch.Tensor, x_t: torch.Tensor, is_masked: torch.Tensor, p: torch.Tensor,
               is_eligible: torch.Tensor, alpha: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_AR + alpha * L_diff, L_AR, L_diff) from one forward of ``[x_t | x_0]``.

    L_AR: mean CE of clean logit i against x0[i+1]. L_diff: sum over masked i of CE(noisy logit i, x0[i]) / p,
    divided by the number of maskable tokens (LLaDA's unbiased per-token estimate of the NELBO).
    """
    batch, length = x0.shape
    block_size = model.config.block_size
    logits = model.forward_dense(torch.cat([x_t, x0], dim=1), doubled_positions(batch, length),
                                 block_diff_mask(length, block_size))
    l_ar = F.cross_entropy(logits[:, length:-1].flatten(0, 1).float(), x0[:, 1:].flatten())
    ce = F.cross_entropy(logits[:, :length][is_masked].float(), x0[is_masked], reduction="none")
    weight = (1.0 / p).expand(batch, length)[is_masked]
    l_diff = (ce * weight).sum() / is_eligible.sum().clamp(min=1)
    return l_ar + alpha * l_diff, l_ar, l_diff


# ---- drafts ---------------------------------------------------------------------------------------------


def draft_logits(model: NLDModel, x0: torch.Tensor, use_lora: bool) -> torch.Tensor:
    """Diffusion logits [B, L, V] of the one-pass draft of every block: [seed, MASK x (B-1)] over the clean
    prefix, the drafter LoRA on the block tokens only (exactly the inference draft pass)."""
    batch, length = x0.shape
    cfg = model.config
    x_t = torch.where(is_seed_slot(length, cfg.block_size), x0, cfg.mask_token_id)
    lora_mask = torch.cat([torch.ones_like(x0), torch.zeros_like(x0)], dim=1) if use_lora else None
    logits = model.forward_dense(torch.cat([x_t, x0], dim=1), doubled_positions(batch, length),
                                 block_diff_mask(length, cfg.block_size), lora_mask)
    return logits[:, :length]


@torch.no_grad()
def greedy_block_rollout(model: NLDModel, x0: torch.Tensor, max_iters: int | None = None) -> torch.Tensor:
    """[B, L]: for every block, its seed x0[slot 0] followed by the AR model's greedy continuation of
    (clean prefix + seed), i.e. the tokens a greedy verify pass accepts.

    Jacobi iteration: start from the teacher-forced argmax; iteration k makes slot k+1 exact, so
    ``max_iters`` = k gives exact slots 1..k+1 (None: iterate to the fixed point, at most block_size-1).
    """
    batch, length = x0.shape
    block_size = model.config.block_size
    is_seed = is_seed_slot(length, block_size)

    def next_guess(logits: torch.Tensor) -> torch.Tensor:
        shifted = torch.cat([x0[:, :1], logits[:, :-1].argmax(-1)], dim=1)  # slot j <- argmax of logit j-1
        return torch.where(is_seed, x0, shifted)

    guess = next_guess(model.forward_dense(x0, torch.arange(length)[None].expand(batch, length),
                                           causal_mask(length)))
    mask, positions = block_causal_mask(length, block_size), doubled_positions(batch, length)
    for _ in range(block_size - 1 if max_iters is None else max_iters):
        new = next_guess(model.forward_dense(torch.cat([guess, x0], dim=1), positions, mask)[:, :length])
        if torch.equal(new, guess):
            break
        guess = new
    return guess


def accepted_lengths(draft: torch.Tensor, target: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, L/block] number of leading draft tokens (slots 1..) equal to the target (greedy acceptance)."""
    batch, length = draft.shape
    match = (draft == target).view(batch, length // block_size, block_size)[..., 1:]
    return match.long().cumprod(dim=-1).sum(dim=-1)


def unigram_entropy(token_ids: torch.Tensor, vocab_size: int) -> float:
    """Entropy (nats) of the unigram distribution of ``token_ids``: the level a diffusion branch that
    ignores its context stays at."""
    counts = torch.bincount(token_ids.flatten(), minlength=vocab_size).double()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log()).sum())


@torch.no_grad()
def evaluate(model: NLDModel, windows: torch.Tensor, eps: float = 1e-3, batch_size: int = 8,
             seed: int = 1234) -> dict[str, float]:
    """Held-out metrics (nats/token) on fixed windows [N, L]: ``ar`` (next-token CE), ``ar_top1``, ``diff``
    (the NLD diffusion loss with stratified t and fixed noise), ``draft_ce`` / ``draft_top1`` (one-pass
    draft: slot 0 clean, every other slot masked, base model without LoRA)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    totals = {"ar": 0.0, "ar_top1": 0.0, "diff": 0.0, "draft_ce": 0.0, "draft_top1": 0.0}
    num = len(windows)
    for start in range(0, num, batch_size):
        x0 = windows[start:start + batch_size]
        batch, length = x0.shape
        logits = model.forward_dense(x0, torch.arange(length)[None].expand(batch, length), causal_mask(length))
        totals["ar"] += batch * float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x0[:, 1:].flatten()))
        totals["ar_top1"] += batch * float((logits[:, :-1].argmax(-1) == x0[:, 1:]).float().mean())
        t = ((torch.arange(start, start + batch) + 0.5) / num)[:, None]
        noised = add_noise(x0, cfg.mask_token_id, cfg.block_size, gen, eps, t=t)
        totals["diff"] += batch * float(joint_loss(model, x0, *noised)[2])
        logits = draft_logits(model, x0, use_lora=False)
        is_draft = ~is_seed_slot(length, cfg.block_size)
        totals["draft_ce"] += batch * float(F.cross_entropy(logits[:, is_draft].flatten(0, 1).float(),
                                                            x0[:, is_draft].flatten()))
        totals["draft_top1"] += batch * float((logits[:, is_draft].argmax(-1) == x0[:, is_draft]).float().mean())
    return {k: v / num for k, v in totals.items()}


def cosine_lr(peak: float, progress: float, step: int, warmup_steps: int, final_fraction: float = 0.1) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``peak`` to ``final_fraction * peak`` as
    ``progress`` goes 0 -> 1."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak * warm * (final_fraction + (1 - final_fraction) * cos)

"""Rotary position embeddings of the NLD model: plain or YaRN frequencies, rotate-half (NeoX) style, and
the Llama-4 query scaling by absolute position (applied after RoPE, to queries only)."""

from __future__ import annotations

import math

import torch

from trimode.runtime.model.config import RopeConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (fp32) and the attention factor that multiplies cos/sin."""
    base = rope.rope_theta
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim
    pos_freqs = base ** exponents
    if rope.rope_type == "default":
        return (1.0 / pos_freqs).float(), 1.0
    # YaRN: interpolate low frequencies by `factor`, keep high frequencies, linear ramp in between.
    factor = rope.factor
    if rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:  # as Hugging Face: a zero mscale means the plain YaRN factor 0.1 ln(f) + 1
        attention_factor = _yarn_mscale(factor)
    orig = rope.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1.0 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq.float(), attention_factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, head_dim] for rotate-half RoPE."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., heads, head_dim]; cos/sin: [..., head_dim] (broadcast over heads)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


def llama4_query_scale(positions: torch.Tensor, rope: RopeConfig) -> torch.Tensor | None:
    """1 + beta * ln(1 + floor(pos / original_max_position_embeddings)), or None when beta is 0."""
    if not rope.llama_4_scaling_beta:
        return None
    floor = torch.floor(positions.to(torch.float32) / rope.original_max_position_embeddings)
    return 1.0 + rope.llama_4_scaling_beta * torch.log1p(floor)

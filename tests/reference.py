"""An independent, deliberately simple reference for the NLD model and its three greedy decoding algorithms.

Written from ``shared/spec/model.md`` (and the runtime brief), NOT from ``trimode.runtime.model.network``/``rope``:
the forward reads the raw checkpoint tensors with safetensors and does its own math (float64 by default),
so a bug in the runtime's layer math, RoPE, query scaling, GQA or LoRA shows up as a disagreement.

There is no KV cache: every step recomputes the whole sequence with an explicit ``allowed[query, key]``
mask, and every algorithm handles one prompt at a time. Slow (O(n^2) forwards of O(n) tokens), which is
fine for the tiny models the tests use. Only ``ModelConfig`` (config.json parsing) is shared with the
runtime.

Token selection everywhere is greedy: argmax over the logits with the mask id excluded (ties: lowest id).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open

from trimode.runtime.model.config import ModelConfig

# ---- weights ------------------------------------------------------------------------------------------


@dataclass
class RefWeights:
    """Raw checkpoint tensors (in ``dtype``) plus the optional drafter LoRA (per layer A [r, Hq*D], B [H, r])."""

    tensors: dict[str, torch.Tensor]
    lora_A: list[torch.Tensor] | None = None
    lora_B: list[torch.Tensor] | None = None
    lora_scale: float = 0.0

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None


def _read_safetensors(files: Iterable[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).to(dtype)
    return out


def load_reference(ckpt_dir: str | Path, dtype: torch.dtype = torch.float64) -> tuple[RefWeights, ModelConfig]:
    """Read config.json, the (possibly sharded) weights and ``linear_spec_lora/`` straight from disk."""
    ckpt_dir = Path(ckpt_dir)
    cfg = ModelConfig.from_file(ckpt_dir / "config.json")
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted({ckpt_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [ckpt_dir / "model.safetensors"]
    weights = RefWeights(_read_safetensors(files, dtype))
    lora_dir = ckpt_dir / "linear_spec_lora"
    if lora_dir.is_dir():
        acfg = json.loads((lora_dir / "adapter_config.json").read_text())
        raw = _read_safetensors([lora_dir / "adapter_model.safetensors"], dtype)
        prefix = "base_model.model.encoder.layers.{}.self_attn.o_proj.lora_{}.weight"
        n = cfg.num_hidden_layers
        weights.lora_A = [raw[prefix.format(i, "A")] for i in range(n)]
        weights.lora_B = [raw[prefix.format(i, "B")] for i in range(n)]
        weights.lora_scale = float(acfg.get("lora_alpha", acfg["r"])) / float(acfg["r"])
    return weights, cfg


# ---- forward ------------------------------------------------------------------------------------------


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
    return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0


def ref_rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [D/2] float64, attention_factor) per HF ``_compute_{default,yarn}_parameters``.

    YaRN: ``factor`` is taken from the config as is (truncate=True, attention_factor from mscale/mscale_all_dim).
    """
    rope, dim = cfg.rope, cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    pos_freqs = rope.rope_theta ** exponents
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    factor = rope.factor
    if rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi))
                / (2 * math.log(rope.rope_theta)))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1.0 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, attention_factor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def ref_logits(weights: RefWeights, cfg: ModelConfig, ids: Sequence[int], allowed: torch.Tensor,
               lora_rows: Iterable[int] | torch.Tensor | None = None,
               positions: Sequence[int] | None = None) -> torch.Tensor:
    """Logits [S, V] of one sequence; ``allowed[i, j]``: query i may attend to key j; LoRA on ``lora_rows``."""
    W = weights.tensors
    dtype = W["diffusion_head.weight"].dtype
    S = len(ids)
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    pos = torch.arange(S, dtype=torch.float64) if positions is None else torch.tensor(positions, dtype=torch.float64)
    allowed = torch.as_tensor(allowed, dtype=torch.bool)
    assert allowed.shape == (S, S), (allowed.shape, S)

    lora = torch.zeros(S, dtype=torch.bool)
    if lora_rows is not None:
        if isinstance(lora_rows, torch.Tensor) and lora_rows.dtype == torch.bool:
            lora = lora_rows.clone().reshape(S)
        else:
            lora[list(lora_rows)] = True
    apply_lora = weights.has_lora and bool(lora.any())

    inv_freq, attention_factor = ref_rope_inv_freq(cfg)
    angles = pos[:, None] * inv_freq[None, :]                       # [S, D/2]
    angles = torch.cat([angles, angles], dim=-1)                     # rotate-half layout
    cos = (angles.cos() * attention_factor).to(dtype)[:, None, :]    # [S, 1, D]
    sin = (angles.sin() * attention_factor).to(dtype)[:, None, :]
    beta = cfg.rope.llama_4_scaling_beta
    q_scale = 1.0 + beta * torch.log1p(torch.floor(pos / cfg.rope.original_max_position_embeddings))
    q_scale = q_scale.to(dtype)[:, None, None]                       # [S, 1, 1]

    x = W["encoder.embed_tokens.weight"][torch.tensor(list(ids), dtype=torch.long)]   # [S, H]
    eps = cfg.rms_norm_eps
    group = Hq // Hkv
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layers.{i}."
        h = _rms_norm(x, W[p + "input_layernorm.weight"], eps)
        q = (h @ W[p + "self_attn.q_proj.weight"].T).view(S, Hq, D)
        k = (h @ W[p + "self_attn.k_proj.weight"].T).view(S, Hkv, D)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).view(S, Hkv, D)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        q = q * q_scale                                               # Llama-4 scaling: after RoPE, q only
        # GQA: query head j reads kv head j // group
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(S, Hq * D)
        out = attn @ W[p + "self_attn.o_proj.weight"].T
        if apply_lora:
            delta = (attn @ weights.lora_A[i].T) @ weights.lora_B[i].T * weights.lora_scale
            out = out + delta * lora[:, None].to(dtype)
        x = x + out
        h = _rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        gate = h @ W[p + "mlp.gate_proj.weight"].T
        up = h @ W[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ W[p + "mlp.down_proj.weight"].T
    x = _rms_norm(x, W["encoder.norm.weight"], eps)
    return x @ W["diffusion_head.weight"].T


# ---- masks and selection ------------------------------------------------------------------------------


def causal_allowed(S: int) -> torch.Tensor:
    return torch.ones(S, S, dtype=torch.bool).tril()


def block_allowed(num_context: int, num_block: int) -> torch.Tensor:
    """Context causal among itself; the block's tokens see all context and the whole block."""
    S = num_context + num_block
    allowed = causal_allowed(S)
    allowed[num_context:, :] = True
    return allowed


def select(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Greedy token(s) with the mask id excluded; logits [..., V] -> ids [...]."""
    logits = logits.clone()
    logits[..., mask_token_id] = float("-inf")
    return logits.argmax(-1)


def _next_causal_token(weights: RefWeights, cfg: ModelConfig, ids: Sequence[int]) -> int:
    logits = ref_logits(weights, cfg, ids, causal_allowed(len(ids)))
    return int(select(logits[-1], cfg.mask_token_id))


def _denoise_logits(weights: RefWeights, cfg: ModelConfig, context: Sequence[int], canvas: Sequence[int],
                    use_lora: bool = False) -> torch.Tensor:
    """Logits [len(canvas), V] at the canvas positions (diffusion: logit i predicts token i, no shift)."""
    C, b = len(context), len(canvas)
    rows = range(C, C + b) if use_lora else None
    return ref_logits(weights, cfg, list(context) + list(canvas), block_allowed(C, b), rows)[C:]


def _truncate_after_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for j, t in enumerate(tokens):
        if t in eos:
            return tokens[: j + 1], True
    return tokens, False


# ---- AR -----------------------------------------------------------------------------------------------


def _think_force(thinking: tuple[int, int] | None, index: int, so_far: Sequence[int]) -> int | None:
    """The thinking budget (spec/model.md section 3): ``thinking`` = (max_thinking_tokens, end_think_id); new
    token number ``index`` is forced to end_think_id when it is number max_thinking_tokens and ``so_far`` (the
    tokens before it) holds no end_think_id."""
    if thinking is None or index != thinking[0] or thinking[1] in so_far:
        return None
    return thinking[1]


def ref_ar_generate(weights: RefWeights, cfg: ModelConfig, prompt: Sequence[int], max_new_tokens: int,
                    eos_ids: Iterable[int] = (), thinking: tuple[int, int] | None = None) -> list[int]:
    eos, emitted = set(eos_ids), []
    while len(emitted) < max_new_tokens:
        forced = _think_force(thinking, len(emitted), emitted)
        emitted.append(forced if forced is not None else _next_causal_token(weights, cfg, list(prompt) + emitted))
        if emitted[-1] in eos:
            break
    return emitted


# ---- block diffusion ----------------------------------------------------------------------------------


def even_split(total: int, steps: int) -> list[int]:
    """``total`` split over ``steps`` as evenly as possible, remainder to the earliest steps (7, 3 -> 3,2,2)."""
    base, rem = divmod(total, steps)
    return [base + (1 if s < rem else 0) for s in range(steps)]


def _denoise_block(weights: RefWeights, cfg: ModelConfig, context: list[int], canvas: list[int], policy: str,
                   threshold: float, max_steps: int, eos: set[int], revealed_per_step: list[int]) -> list[int]:
    MASK = cfg.mask_token_id
    canvas = list(canvas)
    schedule = even_split(sum(t == MASK for t in canvas), max_steps)
    for step in range(max_steps):
        masked = [i for i, t in enumerate(canvas) if t == MASK]
        if not masked:
            break
        logits = _denoise_logits(weights, cfg, context, canvas)
        x0 = select(logits, MASK)
        conf = logits.softmax(-1).gather(-1, x0[:, None])[:, 0]      # raw softmax, mask entry included
        # masked positions by confidence, highest first; ties: lower position first (stable sort)
        by_conf = sorted(masked, key=lambda i: -float(conf[i]))
        if step == max_steps - 1:
            reveal = masked
        elif policy == "threshold":
            reveal = [i for i in masked if float(conf[i]) >= threshold] or by_conf[:1]
        elif policy == "topk":
            reveal = by_conf[: schedule[step]]
        elif policy == "leftmost":
            reveal = masked[: schedule[step]]
        else:
            raise ValueError(f"unknown policy {policy!r}")
        for i in reveal:
            canvas[i] = int(x0[i])
        revealed_per_step.append(len(reveal))
        for j, t in enumerate(canvas):  # an EOS with no mask to its left ends the block
            if t == MASK:
                break
            if t in eos:
                return canvas[: j + 1]
    assert MASK not in canvas, canvas
    return canvas


def ref_diffusion_generate(weights: RefWeights, cfg: ModelConfig, prompt: Sequence[int], max_new_tokens: int,
                           block_length: int, policy: str = "threshold", threshold: float = 0.9,
                           max_steps: int | None = None, causal_context: bool = True,
                           eos_ids: Iterable[int] = (), revealed_per_step: list[int] | None = None,
                           thinking: tuple[int, int] | None = None) -> list[int]:
    """New tokens; if ``revealed_per_step`` is given, the number of tokens each denoising pass revealed is
    appended to it (all blocks, in order). ``thinking``: the budget forces the seed, or the canvas slot at the
    budget position (unmasked from the start)."""
    eos, emitted = set(eos_ids), []
    revealed_per_step = [] if revealed_per_step is None else revealed_per_step
    MASK = cfg.mask_token_id
    steps = max_steps or block_length
    while len(emitted) < max_new_tokens:
        if causal_context:
            # seed = the causal (prefill / commit) prediction after the text so far; emitted at once
            forced = _think_force(thinking, len(emitted), emitted)
            emitted.append(forced if forced is not None else _next_causal_token(weights, cfg, list(prompt) + emitted))
            if emitted[-1] in eos or len(emitted) >= max_new_tokens:
                break
            context = list(prompt) + emitted[:-1]
            b = min(block_length, 1 + max_new_tokens - len(emitted))
            canvas = [emitted[-1]] + [MASK] * (b - 1)
            first = len(emitted) - 1  # canvas slot j holds new token number first + j
        else:
            context = list(prompt) + emitted
            b = min(block_length, max_new_tokens - len(emitted))
            canvas = [MASK] * b
            first = len(emitted)
        if thinking is not None and 0 <= thinking[0] - first < b and canvas[thinking[0] - first] == MASK \
                and _think_force(thinking, thinking[0], emitted) is not None:
            canvas[thinking[0] - first] = thinking[1]
        canvas = _denoise_block(weights, cfg, context, canvas, policy, threshold, steps, eos, revealed_per_step)
        new, hit_eos = _truncate_after_eos(canvas[1:] if causal_context else canvas, eos)
        emitted.extend(new[: max_new_tokens - len(emitted)])
        if hit_eos:
            break
    return emitted


# ---- linear self-speculation --------------------------------------------------------------------------


def ref_spec_generate(weights: RefWeights, cfg: ModelConfig, prompt: Sequence[int], max_new_tokens: int,
                      block_length: int, threshold: float = 0.0, use_lora: bool = True,
                      eos_ids: Iterable[int] = (), thinking: tuple[int, int] | None = None
                      ) -> tuple[list[int], list[int]]:
    """(new tokens, accepted length per draft/verify cycle). Accepted lengths count the tokens each cycle
    emitted (matched drafts + the bonus token, cut after an EOS); the prefill token t0 is not a cycle.
    ``thinking``: the budget forces t0 or the verify's AR token at the budget position (given the drafts
    before it), and the draft canvas holds the forced token at that slot."""
    eos, MASK = set(eos_ids), cfg.mask_token_id
    lora = use_lora and weights.has_lora
    forced = _think_force(thinking, 0, [])
    emitted = [forced if forced is not None else _next_causal_token(weights, cfg, prompt)]
    accepted: list[int] = []
    if emitted[0] in eos:
        return emitted, accepted
    while len(emitted) < max_new_tokens:
        context = list(prompt) + emitted[:-1]
        b = min(block_length, max_new_tokens - len(emitted))
        block = [emitted[-1]] + [MASK] * (b - 1)
        g = len(emitted)  # block slot j (j >= 1) and AR token a_(j-1) are new token number g + j - 1
        k = None if thinking is None else thinking[0] - g
        if k is not None and 0 <= k < b - 1 and _think_force(thinking, thinking[0], emitted) is not None:
            block[k + 1] = thinking[1]
        while MASK in block:  # draft: block-bidirectional, LoRA on the block's tokens
            logits = _denoise_logits(weights, cfg, context, block, use_lora=lora)
            x0 = select(logits, MASK)
            masked = [i for i, t in enumerate(block) if t == MASK]
            if threshold <= 0:
                reveal = masked
            else:
                conf = logits.softmax(-1).gather(-1, x0[:, None])[:, 0]
                reveal = [i for i in masked if float(conf[i]) >= threshold]
                reveal = reveal or sorted(masked, key=lambda i: -float(conf[i]))[:1]
            for i in reveal:
                block[i] = int(x0[i])
        # verify: causal over context + block, no LoRA; a_i predicts block position i + 1
        ids = context + block
        logits = ref_logits(weights, cfg, ids, causal_allowed(len(ids)))[len(context):]
        ar = [int(t) for t in select(logits, MASK)]
        if k is not None and 0 <= k < b:
            forced = _think_force(thinking, g + k, emitted + block[1:k + 1])
            ar[k] = ar[k] if forced is None else forced
        n = 1
        while n < b and ar[n - 1] == block[n]:
            n += 1
        new, hit_eos = _truncate_after_eos(ar[:n], eos)
        emitted.extend(new)
        accepted.append(len(new))
        if hit_eos:
            break
    return emitted, accepted


# ---- fused (quadratic) self-speculation -----------------------------------------------------------------


def ref_fused_spec_generate(weights: RefWeights, cfg: ModelConfig, prompt: Sequence[int], max_new_tokens: int,
                            block_length: int, num_subblocks: int, subblock_length: int, use_lora: bool = True,
                            eos_ids: Iterable[int] = ()) -> tuple[list[int], list[int], int]:
    """(new tokens, accepted length per verify, fallback draft passes). Each step verifies the chain [seed,
    drafts] causally and computes, without any cache, sub-block i (i < min(num_subblocks, chain length)):
    ``subblock_length`` masks at the positions after chain token i that see the text so far, chain tokens 0..i
    and each other (the dense form of the quadratic mask, LoRA on the masks). After n accepted tokens the next
    drafts are sub-block n-1's tokens 1..; with no such sub-block (or at the start) a linear draft pass of the
    seed block drafts instead. Greedy (argmax, mask id excluded)."""
    eos, MASK = set(eos_ids), cfg.mask_token_id
    lora = use_lora and weights.has_lora
    end = len(prompt) + max_new_tokens
    emitted = [_next_causal_token(weights, cfg, prompt)]
    accepted: list[int] = []
    carry: list[int] | None = None
    fallbacks = 0
    if emitted[0] in eos:
        return emitted, accepted, fallbacks
    while len(emitted) < max_new_tokens:
        context = list(prompt) + emitted[:-1]
        remaining = max_new_tokens - len(emitted)
        if carry is None:  # a linear draft pass: [seed, MASK x (b-1)], every mask filled at once
            b = max(min(block_length, remaining), 1)
            chain = [emitted[-1]] + [MASK] * (b - 1)
            if b > 1:
                x0 = select(_denoise_logits(weights, cfg, context, chain, use_lora=lora), MASK)
                chain = [chain[0]] + [int(t) for t in x0[1:]]
        else:
            b = max(min(subblock_length, remaining), 1)
            chain = [emitted[-1]] + carry[:b - 1]
        ids = context + chain
        logits = ref_logits(weights, cfg, ids, causal_allowed(len(ids)))[len(context):]
        ar = [int(t) for t in select(logits, MASK)]
        subs = []
        for i in range(min(num_subblocks, len(chain))):
            length = min(subblock_length, end - (len(context) + i + 1))
            if length < 2:
                break
            sub = _denoise_logits(weights, cfg, context + chain[:i + 1], [MASK] * length, use_lora=lora)
            subs.append([int(t) for t in select(sub, MASK)])
        n = 1
        while n < len(chain) and ar[n - 1] == chain[n]:
            n += 1
        new, hit_eos = _truncate_after_eos(ar[:n], eos)
        emitted.extend(new)
        accepted.append(len(new))
        if hit_eos or len(emitted) >= max_new_tokens:
            break
        if n - 1 < len(subs):
            carry = subs[n - 1][1:]
        else:
            carry = None
            fallbacks += len(subs) == min(num_subblocks, len(chain))  # not when the request's end cut sub-blocks
    return emitted, accepted, fallbacks

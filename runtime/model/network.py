"""The Nemotron-Labs-Diffusion network: a Ministral3 decoder (pre-norm RMSNorm, GQA with explicit head_dim,
SwiGLU, YaRN RoPE, Llama-4 query scaling) with one untied output head, ``diffusion_head``, used by every mode.

The module names match the checkpoint (``encoder.layers.i.self_attn.q_proj.weight``, ``diffusion_head.weight``).
Attention is not computed here: each forward receives an ``attend(layer, q, k, v)`` callable, so the same
weights and layer math serve dense forwards (training, full-recompute checks: ``forward_dense``) and paged
forwards over the shared KV cache (``runtime.executor``). The drafter LoRA on ``o_proj`` is applied only to
tokens whose ``lora_mask`` is 1 (draft passes).

Batch-invariant execution (``NLDModel.batch_invariant``, off by default): every row-mixing computation (the
linears, RMSNorm, the head, and with ``batch_invariant_attention`` the attention) runs one token row at a time
on a fresh copy, so a token's hidden state and logits are bitwise the same whatever else shares its forward
(a 1-token decode pass, a 16-token verify pass, other sequences). Batched GEMMs and attention pick their
reduction order by shape, which is why a verify pass and a decode pass otherwise round differently (visible in
bf16 at near-ties); the price is one small GEMM per token and layer (slow: an opt-in for exactness checks and
for callers who need greedy self-speculation to equal AR bit for bit).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from trimode.runtime.model.config import ModelConfig
from trimode.runtime.model.rope import apply_rope, llama4_query_scale, rope_cos_sin, rope_frequencies

# attend(layer_idx, q [..., Hq, D], k [..., Hkv, D], v [..., Hkv, D]) -> [..., Hq, D]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LoraAdapter(nn.Module):
    """Low-rank drafter adapter on every layer's o_proj: delta(x) = scale * (x A^T) B^T, scale = alpha / r."""

    def __init__(self, num_layers: int, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.rank, self.alpha = rank, float(alpha)
        self.lora_A = nn.ParameterList(nn.Parameter(torch.zeros(rank, in_features)) for _ in range(num_layers))
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(out_features, rank)) for _ in range(num_layers))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[layer_idx], self.lora_B[layer_idx]
        return (x @ a.to(x.dtype).T) @ b.to(x.dtype).T * self.scale


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=False)
        self.hq, self.hkv, self.d = hq, hkv, d


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class NLDModel(nn.Module):
    """Weights and layer math of a tri-mode model. See the module docstring for how attention plugs in."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.diffusion_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lora: LoraAdapter | None = None
        self.batch_invariant = False  # see the module docstring; executors that honour it compute attention row-wise
        # Sum of partial results across tensor-parallel ranks (identity on one rank): applied to the attention
        # output (o_proj + LoRA) and the MLP output of every layer. See runtime/parallel/sharding.py.
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _identity
        inv_freq, attention_factor = rope_frequencies(cfg.rope, cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_attention_factor = attention_factor

    # ---- LoRA -----------------------------------------------------------------------------------------

    def set_lora(self, adapter: LoraAdapter | None) -> None:
        self.lora = adapter

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors (``encoder.*``, ``diffusion_head.weight``), without the adapter."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lora.")}

    # ---- forward --------------------------------------------------------------------------------------

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                       lora_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [..., H] for tokens [...] at absolute positions [...].

        ``lora_mask`` ([...], 0/1) selects the tokens whose o_proj gets the drafter LoRA.
        """
        h = self.encoder.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_attention_factor, h.dtype)
        q_scale = llama4_query_scale(positions, self.config.rope)
        use_lora = self.lora is not None and lora_mask is not None and bool(lora_mask.any())
        if use_lora:
            token_gate = lora_mask.to(h.dtype)[..., None]
        lead = input_ids.shape
        rows = by_rows if self.batch_invariant else _apply
        for i, layer in enumerate(self.encoder.layers):
            attn = layer.self_attn
            x = rows(layer.input_layernorm, h)
            q = rows(attn.q_proj, x).view(*lead, attn.hq, attn.d)
            k = rows(attn.k_proj, x).view(*lead, attn.hkv, attn.d)
            v = rows(attn.v_proj, x).view(*lead, attn.hkv, attn.d)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if q_scale is not None:
                q = q * q_scale.to(q.dtype)[..., None, None]
            o = attend(i, q, k, v).reshape(*lead, attn.hq * attn.d)
            out = rows(attn.o_proj, o)
            if use_lora:
                out = out + rows(lambda x, i=i: self.lora.delta(i, x), o) * token_gate
            h = h + self.reduce(out)
            h = h + self.reduce(rows(lambda x, f=layer: f.mlp(f.post_attention_layernorm(x)), h))
        return rows(self.encoder.norm, h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of final hidden states [..., H] (row by row when ``batch_invariant``)."""
        return (by_rows if self.batch_invariant else _apply)(self.diffusion_head, hidden)

    def forward_dense(self, input_ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                      lora_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, V] of a cache-free forward. ``allowed`` [S, S] or [B, S, S] (bool): query i may see key j."""
        mask = allowed if allowed.dim() == 3 else allowed[None]
        mask = mask[:, None]  # [B, 1, S, S], broadcast over heads

        def attend(_: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                scale=self.config.softmax_scale, enable_gqa=True)
            return out.transpose(1, 2)

        return self.logits(self.forward_hidden(input_ids, positions, attend, lora_mask))


_INITIALIZERS = ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_", "zeros_", "ones_")
_ORIGINAL_INIT = {name: getattr(nn.init, name) for name in _INITIALIZERS}
_init_lock = threading.Lock()
_init_users = 0
_skipping = threading.local()


def _skippable(name: str) -> Callable:
    original = _ORIGINAL_INIT[name]

    def init(tensor, *args, **kwargs):
        return tensor if getattr(_skipping, "active", False) else original(tensor, *args, **kwargs)
    return init


@contextmanager
def on_meta_device() -> Iterator[None]:
    """Build modules on the meta device with their initializers skipped (weights are loaded next).

    Plain ``with torch.device("meta")`` runs every initializer on meta tensors, whose Python kernels import
    torch._dynamo: seconds of start-up per process for nothing. While any thread is inside, torch.nn.init's
    initializers are wrapped; the wrappers skip only in the threads inside this context.
    """
    global _init_users
    with _init_lock:
        if _init_users == 0:
            for name in _INITIALIZERS:
                setattr(nn.init, name, _skippable(name))
        _init_users += 1
    _skipping.active = True
    try:
        with torch.device("meta"):
            yield
    finally:
        _skipping.active = False
        with _init_lock:
            _init_users -= 1
            if _init_users == 0:
                for name, fn in _ORIGINAL_INIT.items():
                    setattr(nn.init, name, fn)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return fn(x)


def by_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to each token row of x [..., H] alone, on a fresh (aligned, contiguous) copy, results
    concatenated: [..., H'] bitwise independent of the other rows (the batch-invariant form of a row-wise op)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.cat([fn(flat[r:r + 1].clone()) for r in range(flat.shape[0])]) if flat.shape[0] else fn(flat)
    return out.view(*x.shape[:-1], out.shape[-1])


def batch_invariant_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor,
                              v_pool: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                              query_start: torch.Tensor, is_causal: bool, scale: float) -> torch.Tensor:
    """Paged attention (the op of docs/kernels.md, as ``plugins.paged_attention``) with each query row computed
    alone over exactly the keys it sees, so that its result does not depend on the other rows of the pass.

    q [T, Hq, D], k_new / v_new [T, Hkv, D] (the pass's new tokens, sequence by sequence as ``query_start``
    [S + 1] int32 delimits), pools [num_pages, page_size, Hkv, D] of one layer, block_tables [S, P] int32,
    context_lens [S] int32 (committed prefix lengths). A causal query at offset j sees prefix + new[:j + 1],
    a block-bidirectional one prefix + all new. fp32 math (softmax(q k^T * scale) v, GQA by head groups),
    q's dtype out: [T, Hq, D]. A query at position p thus always reduces over the same p + 1 keys in the same
    order, whether it is decoded alone or verified inside a block.
    """
    out = torch.empty_like(q)
    page, group = k_pool.shape[1], q.shape[1] // k_pool.shape[2]
    starts, lengths = query_start.tolist(), context_lens.tolist()
    for s, length in enumerate(lengths):
        a, b = starts[s], starts[s + 1]
        pos = torch.arange(length, device=q.device)
        slots = block_tables[s].long()[pos // page] * page + pos % page
        keys = torch.cat([k_pool.flatten(0, 1).index_select(0, slots), k_new[a:b]]).float()
        values = torch.cat([v_pool.flatten(0, 1).index_select(0, slots), v_new[a:b]]).float()
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)  # [L, Hq, D]
        for j in range(b - a):
            seen = length + (j + 1 if is_causal else b - a)
            k, v = keys[:seen].transpose(0, 1).contiguous(), values[:seen].transpose(0, 1).contiguous()
            scores = torch.bmm(q[a + j].float()[:, None].contiguous(), k.transpose(1, 2)) * scale  # [Hq, 1, L]
            out[a + j] = torch.bmm(scores.softmax(-1), v)[:, 0].to(q.dtype)
    return out


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()

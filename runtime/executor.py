"""Executors turn a step's passes into logits. One small interface, a registry, and the torch reference.

Every executor reads and writes the one ``PagedKVCache`` it is given: kept passes write their K/V at their
positions (the scheduler has reserved the pages), other passes only read. The onnxruntime and TensorRT
executors (engine directories) register here too; they are imported lazily.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .kv_cache import PagedKVCache
from .model import NLDModel
from .passes import SeqPass


class Executor(ABC):
    """Runs one forward over a batch of passes; returns fp32 logits [num_logits, V] per pass."""

    cache: PagedKVCache

    @abstractmethod
    def forward(self, passes: Sequence[SeqPass]) -> list[torch.Tensor]: ...


_REGISTRY: dict[str, Callable[..., Executor]] = {}


def register_executor(name: str) -> Callable:
    def wrap(factory: Callable[..., Executor]) -> Callable[..., Executor]:
        _REGISTRY[name] = factory
        return factory
    return wrap


def make_executor(name: str, **kwargs) -> Executor:
    if name not in _REGISTRY:
        raise ValueError(f"unknown executor {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def paged_attention_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_prefix: torch.Tensor,
                              v_prefix: torch.Tensor, is_causal: bool, scale: float) -> torch.Tensor:
    """Attention of T new queries over [prefix ; new] keys. q [T, Hq, D]; k/v_new [T, Hkv, D];
    k/v_prefix [L, Hkv, D]. Causal: query i sees keys < L + i + 1; otherwise all L + T keys."""
    k = torch.cat([k_prefix, k_new]).transpose(0, 1)
    v = torch.cat([v_prefix, v_new]).transpose(0, 1)
    num_new, num_prefix = q.shape[0], k_prefix.shape[0]
    mask = None
    if is_causal:
        mask = torch.ones(num_new, num_prefix + num_new, dtype=torch.bool, device=q.device)
        mask[:, num_prefix:] = torch.ones(num_new, num_new, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


@register_executor("torch")
class TorchExecutor(Executor):
    """The reference executor: the NLDModel's layers with paged attention in plain PyTorch."""

    def __init__(self, model: NLDModel, cache: PagedKVCache) -> None:
        self.model, self.cache = model, cache

    @torch.no_grad()
    def forward(self, passes: Sequence[SeqPass]) -> list[torch.Tensor]:
        device = self.cache.k_pool.device
        ids = torch.tensor([t for p in passes for t in p.token_ids], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(p.start_pos, p.end_pos) for p in passes]).to(device)
        lora_mask = torch.cat([torch.full((p.num_tokens,), p.use_lora) for p in passes]).to(device)
        offsets = [0]
        for p in passes:
            offsets.append(offsets[-1] + p.num_tokens)
        prefix_slots = [self.cache.slots(p.seq_id, 0, p.start_pos, device) for p in passes]
        new_slots = [self.cache.slots(p.seq_id, p.start_pos, p.num_tokens, device) if p.kind.keeps_kv else None
                     for p in passes]
        scale = self.model.config.softmax_scale

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = torch.empty_like(q)
            for i, p in enumerate(passes):
                a, b = offsets[i], offsets[i + 1]
                k_prefix, v_prefix = self.cache.gather(layer, prefix_slots[i])
                out[a:b] = paged_attention_reference(q[a:b], k[a:b], v[a:b], k_prefix.to(q.dtype),
                                                     v_prefix.to(q.dtype), p.kind.is_causal, scale)
                if new_slots[i] is not None:
                    self.cache.write(layer, new_slots[i], k[a:b], v[a:b])
            return out

        hidden = self.model.forward_hidden(ids, positions, attend, lora_mask)
        rows = torch.cat([torch.arange(offsets[i + 1] - p.num_logits, offsets[i + 1]) for i, p in enumerate(passes)])
        logits = self.model.logits(hidden[rows.to(device)]).float()
        return list(logits.split([p.num_logits for p in passes]))

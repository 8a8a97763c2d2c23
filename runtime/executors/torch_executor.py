"""The torch executor: the NLDModel's layers in PyTorch, the reference every other executor is compared with.

It builds the op inputs of docs/kernels.md (block tables, context lengths, query offsets, slot mapping) once
per forward and calls ``trimode.plugins.dispatch`` for attention and KV writes (Triton kernels on CUDA, the
torch references on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from trimode.plugins import dispatch as ops
from trimode.runtime.executors.base import Executor, register_executor
from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.model.network import NLDModel
from trimode.runtime.passes import SeqPass


@dataclass(frozen=True)
class AttentionRun:
    """A contiguous run of the forward's sequences sharing one attention pattern: one paged_attention call."""

    is_causal: bool
    rows: slice  # token rows of the forward
    block_tables: torch.Tensor  # [num_seqs, max_pages] int32 (padding -1)
    context_lens: torch.Tensor  # [num_seqs] int32: committed prefix lengths
    query_start: torch.Tensor  # [num_seqs + 1] int32, from 0
    max_query_len: int
    max_context_len: int


def attention_runs(cache: PagedKVCache, passes: Sequence[SeqPass], device: torch.device) -> list[AttentionRun]:
    """The op inputs of docs/kernels.md for passes ordered causal-first (so each pattern is one run of rows)."""
    runs, row = [], 0
    for is_causal in (True, False):
        group = [p for p in passes if p.kind.is_causal == is_causal]
        if not group:
            continue
        lens = [p.num_tokens for p in group]
        starts = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        runs.append(AttentionRun(
            is_causal, slice(row, row + sum(lens)), cache.block_table_tensor([p.seq_id for p in group]).to(device),
            torch.tensor([p.start_pos for p in group], dtype=torch.int32, device=device), starts.to(device),
            max(lens), max(p.start_pos for p in group)))
        row += sum(lens)
    return runs


@register_executor("torch")
class TorchExecutor(Executor):
    """The NLDModel's layers in PyTorch with attention and KV writes through the ``trimode.plugins`` ops: the
    Triton kernels on CUDA, the torch references on CPU. ``kernels`` ("auto" / "reference" / "triton", default:
    the TRIMODE_KERNELS environment variable, else "auto") forces one (see plugins.dispatch)."""

    def __init__(self, model: NLDModel, cache: PagedKVCache, kernels: str | None = None) -> None:
        self.model, self.cache, self.kernels = model, cache, kernels

    @torch.no_grad()
    def forward(self, passes: Sequence[SeqPass]) -> list[torch.Tensor]:
        device = self.cache.k_pool.device
        # causal passes first: each attention pattern is then one contiguous run of token rows
        order = sorted(range(len(passes)), key=lambda i: not passes[i].kind.is_causal)
        batch = [passes[i] for i in order]
        ids = torch.tensor([t for p in batch for t in p.token_ids], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(p.start_pos, p.end_pos) for p in batch]).to(device)
        lora_mask = torch.cat([torch.full((p.num_tokens,), p.use_lora) for p in batch]).to(device)
        runs = attention_runs(self.cache, batch, device)
        # kept passes write their K/V after each layer's attention; the others get slot -1 (not written)
        slot_mapping = torch.cat([self.cache.slots(p.seq_id, p.start_pos, p.num_tokens, device) if p.kind.keeps_kv
                                  else torch.full((p.num_tokens,), -1, dtype=torch.long, device=device)
                                  for p in batch])
        keeps_any = any(p.kind.keeps_kv for p in batch)
        scale, page_size = self.model.config.softmax_scale, self.cache.page_size

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_pool, v_pool = self.cache.k_pool[layer], self.cache.v_pool[layer]
            outs = [ops.paged_attention(q[r.rows], k[r.rows], v[r.rows], k_pool, v_pool, r.block_tables,
                                        r.context_lens, r.query_start, r.is_causal, scale, page_size,
                                        backend=self.kernels, max_query_len=r.max_query_len,
                                        max_context_len=r.max_context_len) for r in runs]
            if keeps_any:
                ops.kv_append(k, v, k_pool, v_pool, slot_mapping, backend=self.kernels)
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        hidden = self.model.forward_hidden(ids, positions, attend, lora_mask)
        ends = torch.tensor([p.num_tokens for p in batch]).cumsum(0).tolist()
        rows = torch.cat([torch.arange(end - p.num_logits, end) for p, end in zip(batch, ends)])
        logits = list(self.model.logits(hidden[rows.to(device)]).float().split([p.num_logits for p in batch]))
        out: list[torch.Tensor] = [torch.empty(0)] * len(passes)
        for i, lg in zip(order, logits):
            out[i] = lg
        return out

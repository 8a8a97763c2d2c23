"""The torch executor: the NLDModel's layers in PyTorch, the reference every other executor is compared with.

It builds the op inputs of docs/kernels.md (block tables, context lengths, query offsets, slot mapping) once
per forward, from host-side lists, and calls ``trimode.plugins.dispatch`` for attention and KV writes (Triton
kernels on CUDA). With the reference backend (CPU) the per-layer work is batched instead: the padded layout of
each attention run (``plugins.paged_attention.padded_layout``) and the rows and slots of kept tokens are built
once per forward, so a layer's attention is a few gathers and one SDPA over the batch, and its KV write one
``index_copy_`` per pool, whatever the number of sequences (the per-sequence reference loop, with its argument
checks on every call, cost more than the 3 M-parameter tiny model's matmuls).

Decisions (``SeqPass.decide``): the head runs on the logit rows of the passes that return logits and on the rows
the decisions read (``executors.decisions.decision_feeds``: the layout every executor shares), and the decisions are
``plugins.dispatch.draft_verify`` / ``confidence_unmask`` (Triton kernels on CUDA, references on CPU); only
their results go to the host.

Threads: the executor owns torch's intra-op pool (``threads``; runtime.settings.ThreadPlan).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Sequence

import torch

from trimode.plugins import dispatch as ops
from trimode.runtime.executors.base import Executor, register_executor
from trimode.runtime.executors.decisions import decision_feeds
from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.model.network import NLDModel, batch_invariant_attention
from trimode.runtime.passes import PassOutput, SeqPass, split_outputs
from trimode.runtime.settings import ThreadPlan


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
    layout: Any = None  # plugins.paged_attention.PaddedLayout (reference backend), else None


def block_tables(cache: PagedKVCache, seq_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """``cache.block_table_tensor`` in one tensor build: [num_seqs, max_pages] int32, padding -1."""
    tables = [cache.block_table(s) for s in seq_ids]
    width = max([len(t) for t in tables] + [1])
    return torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)


def slot_list(cache: PagedKVCache, seq_id: int, start: int, count: int) -> list[int]:
    """``cache.slots`` as a host list: flat slots (page * page_size + row) of positions start .. start+count-1."""
    table, size = cache.block_table(seq_id), cache.page_size
    return [table[pos // size] * size + pos % size for pos in range(start, start + count)]


def attention_runs(cache: PagedKVCache, passes: Sequence[SeqPass], device: torch.device,
                   padded: bool = False) -> list[AttentionRun]:
    """The op inputs of docs/kernels.md for passes ordered causal-first (so each pattern is one run of rows);
    with ``padded``, also each run's ``PaddedLayout`` (the reference backend's batched form)."""
    runs, row = [], 0
    for is_causal in (True, False):
        group = [p for p in passes if p.kind.is_causal == is_causal]
        if not group:
            continue
        lens, ctx = [p.num_tokens for p in group], [p.start_pos for p in group]
        tables = block_tables(cache, [p.seq_id for p in group], device)
        layout = None
        if padded:
            from trimode.plugins.paged_attention import padded_layout  # (kernel module: imported on first use)

            layout = padded_layout(tables, ctx, lens, cache.page_size, is_causal)
        runs.append(AttentionRun(
            is_causal, slice(row, row + sum(lens)), tables, torch.tensor(ctx, dtype=torch.int32, device=device),
            torch.tensor([0, *accumulate(lens)], dtype=torch.int32, device=device), max(lens), max(ctx), layout))
        row += sum(lens)
    return runs


@register_executor("torch")
class TorchExecutor(Executor):
    """The NLDModel's layers in PyTorch with attention and KV writes through the ``trimode.plugins`` ops: the
    Triton kernels on CUDA, the torch references on CPU (batched, see the module docstring). ``kernels``
    ("auto" / "reference" / "triton", default: the TRIMODE_KERNELS environment variable, else "auto") forces one
    (see plugins.dispatch). ``threads`` (0 / None: runtime.settings.resolve_threads for the model's weights)
    sets torch's intra-op pool when the executor is made. It decides (``decides``; module docstring)."""

    decides = True

    def __init__(self, model: NLDModel, cache: PagedKVCache, kernels: str | None = None,
                 threads: int | None = None) -> None:
        self.model, self.cache, self.kernels = model, cache, kernels
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.plan = ThreadPlan.for_executor("torch", threads, weight_bytes)
        self.threads = self.plan.torch_threads
        self.plan.apply()

    @torch.no_grad()
    def forward(self, passes: Sequence[SeqPass]) -> list[PassOutput]:
        device, cache = self.cache.k_pool.device, self.cache
        # causal passes first: each attention pattern is then one contiguous run of token rows
        order = sorted(range(len(passes)), key=lambda i: not passes[i].kind.is_causal)
        batch = [passes[i] for i in order]
        ids = torch.tensor([t for p in batch for t in p.token_ids], dtype=torch.long, device=device)
        positions = torch.tensor([i for p in batch for i in range(p.start_pos, p.end_pos)], device=device)
        lora_mask = None
        if any(p.use_lora for p in batch):
            lora_mask = torch.tensor([p.use_lora for p in batch for _ in range(p.num_tokens)], device=device)
        invariant = self.model.batch_invariant  # each row alone (runtime.model.network)
        is_reference = not invariant and ops.resolve_backend(device, self.kernels) == "reference"
        runs = attention_runs(cache, batch, device, padded=is_reference)
        # kept passes write their K/V before each layer's attention; the others get slot -1 (not written)
        slot_mapping = [s for p in batch for s in (slot_list(cache, p.seq_id, p.start_pos, p.num_tokens)
                                                   if p.kind.keeps_kv else [-1] * p.num_tokens)]
        keeps_any = any(p.kind.keeps_kv for p in batch)
        if is_reference:  # the kept rows and their slots, once: one index_copy_ per pool and layer
            kept_rows = [i for i, s in enumerate(slot_mapping) if s >= 0]
            kept_slots = torch.tensor([slot_mapping[i] for i in kept_rows], dtype=torch.long, device=device)
            kept = None if len(kept_rows) == len(slot_mapping) else torch.tensor(kept_rows, device=device)
            from trimode.plugins.paged_attention import paged_attention_padded
        else:
            slot_tensor = torch.tensor(slot_mapping, dtype=torch.long, device=device)
        scale, page_size = self.model.config.softmax_scale, cache.page_size

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # kv-first (docs/kernels.md): kept K/V is in the pool before attention, so a fused spec step's
            # sub-blocks read the chain tokens of this very forward from the pool; no other pass reads its own rows
            k_pool, v_pool = cache.k_pool[layer], cache.v_pool[layer]
            if is_reference:
                if keeps_any:
                    for new, pool in ((k, k_pool), (v, v_pool)):
                        rows = new if kept is None else new.index_select(0, kept)
                        pool.view(-1, *pool.shape[2:]).index_copy_(0, kept_slots, rows.to(pool.dtype))
                outs = [paged_attention_padded(q[r.rows], k[r.rows], v[r.rows], k_pool, v_pool, r.layout, scale)
                        for r in runs]
            elif invariant:
                if keeps_any:
                    ops.kv_append(k, v, k_pool, v_pool, slot_tensor, backend=self.kernels)
                outs = [batch_invariant_attention(q[r.rows], k[r.rows], v[r.rows], k_pool, v_pool, r.block_tables,
                                                  r.context_lens, r.query_start, r.is_causal, scale) for r in runs]
            else:
                if keeps_any:
                    ops.kv_append(k, v, k_pool, v_pool, slot_tensor, backend=self.kernels)
                outs = [ops.paged_attention(q[r.rows], k[r.rows], v[r.rows], k_pool, v_pool, r.block_tables,
                                            r.context_lens, r.query_start, r.is_causal, scale, page_size,
                                            backend=self.kernels, max_query_len=r.max_query_len,
                                            max_context_len=r.max_context_len) for r in runs]
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        hidden = self.model.forward_hidden(ids, positions, attend, lora_mask)
        rows = [i for p, end in zip(batch, accumulate(p.num_tokens for p in batch)) if not p.decide
                for i in range(end - p.num_logits, end)]
        decisions = decision_feeds(batch) if any(p.decide for p in batch) else None
        if decisions is not None:
            rows += decisions["decide_index"].tolist()
        if len(rows) != hidden.shape[0] or rows != list(range(len(rows))):
            hidden = hidden[torch.tensor(rows, dtype=torch.long, device=device)]
        logits = self.model.logits(hidden).float()
        outputs = split_outputs(batch, logits, *self._decide(logits[sum(p.num_logits for p in batch if not p.decide):],
                                                              decisions))
        out: list[PassOutput] = [PassOutput()] * len(passes)
        for i, o in zip(order, outputs):
            out[i] = o
        return self.count(out)

    def _decide(self, logits: torch.Tensor, feeds: dict | None) -> tuple:
        """(accepted, bonus, tokens, confidence) on the host from the decision rows' logits [Q, V] (causal passes'
        rows first: the batch is ordered causal-first), or four Nones without deciding passes."""
        if feeds is None:
            return None, None, None, None
        device, mask_id = logits.device, self.model.config.mask_token_id
        accepted = bonus = tokens = confidence = None
        num_verify = len(feeds["draft_lens"])
        causal_rows = int(feeds["verify_gather"].max()) + 1 if num_verify else 0
        if num_verify:
            width = feeds["draft_tokens"].shape[1] + 1
            target = logits[torch.from_numpy(feeds["verify_gather"]).to(device)].view(num_verify, width, -1)
            accepted, bonus = ops.draft_verify(torch.from_numpy(feeds["draft_tokens"]).to(device), target,
                                               torch.from_numpy(feeds["draft_lens"]).to(device), mask_id,
                                               backend=self.kernels)
            accepted, bonus = accepted.cpu(), bonus.cpu()
        if causal_rows < logits.shape[0]:
            unmask = logits[causal_rows:]
            tokens, confidence = ops.confidence_unmask(unmask, torch.ones(unmask.shape[0], dtype=torch.bool,
                                                                          device=device), mask_id,
                                                       backend=self.kernels)
            tokens, confidence = tokens.cpu(), confidence.cpu()
        return accepted, bonus, tokens, confidence

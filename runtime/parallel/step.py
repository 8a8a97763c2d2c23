"""The step broadcast that keeps every tensor-parallel rank's KV cache in lockstep.

Rank 0 owns the requests and runs the scheduler and the mode policies (runtime.engine); its executor
(``TensorParallelExecutor``) broadcasts each step's passes and their block tables before computing, and the
other ranks (``TensorParallelWorker``) run the same forward on their shards, writing the same pages of their
mirrored pools (``MirrorCache``). Only rank 0 receives logits (the full vocabulary, gathered), so sampling,
acceptance and unmasking run once, on rank 0, unchanged for every mode. ``handshake`` checks, once, that every
rank loaded the same model and pool geometry.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from trimode.runtime.executors.base import Executor
from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.model.config import ModelConfig
from trimode.runtime.model.network import NLDModel
from trimode.runtime.parallel.comm import TensorParallelConfigError, TensorParallelError, TPComm
from trimode.runtime.passes import PassKind, PassOutput, SeqPass

OP_STEP, OP_STOP, OP_KEEPALIVE = 1, 2, 3
_KINDS = list(PassKind)
_FIELDS = 7  # seq_id, kind, start_pos, num_tokens, num_logits, use_lora, table length


def encode_step(passes: Sequence[SeqPass], tables: Sequence[Sequence[int]]) -> list[int]:
    """A step's passes and their block tables as one int list (the payload rank 0 broadcasts)."""
    head, tail = [len(passes)], []
    for p, table in zip(passes, tables, strict=True):
        head += [p.seq_id, _KINDS.index(p.kind), p.start_pos, p.num_tokens, p.num_logits, int(p.use_lora), len(table)]
        tail += [*p.token_ids, *table]
    return head + tail


def decode_step(payload: Sequence[int]) -> tuple[list[SeqPass], list[list[int]]]:
    count = payload[0]
    at = 1 + _FIELDS * count
    passes, tables = [], []
    for i in range(count):
        seq_id, kind, start, num_tokens, num_logits, use_lora, table_len = payload[1 + _FIELDS * i:1 + _FIELDS * (i + 1)]
        tokens = tuple(payload[at:at + num_tokens])
        at += num_tokens
        tables.append(list(payload[at:at + table_len]))
        at += table_len
        passes.append(SeqPass(seq_id, _KINDS[kind], tokens, start, num_logits, bool(use_lora)))
    assert at == len(payload), (at, len(payload))
    return passes, tables


def send_message(comm: TPComm, op: int, payload: Sequence[int] = ()) -> None:
    comm.broadcast(torch.tensor([op, len(payload)], dtype=torch.long, device=comm.device), "step broadcast")
    if payload:
        comm.broadcast(torch.tensor(payload, dtype=torch.long, device=comm.device), "step broadcast")


def recv_message(comm: TPComm) -> tuple[int, list[int]]:
    header = comm.broadcast(torch.empty(2, dtype=torch.long, device=comm.device), "waiting for rank 0's next step")
    op, size = header.tolist()
    if not size:
        return op, []
    return op, comm.broadcast(torch.empty(size, dtype=torch.long, device=comm.device), "step broadcast").tolist()


class MirrorCache(PagedKVCache):
    """A non-leader rank's page pool. Rank 0 owns the bookkeeping; before each forward this mirror takes the
    step's block tables and lengths from it, so every rank reads and writes the same pages."""

    def mirror(self, passes: Sequence[SeqPass], tables: Sequence[list[int]]) -> None:
        assert all(0 <= page < self.num_pages for t in tables for page in t), "block table outside the pool"
        self._tables = {p.seq_id: list(t) for p, t in zip(passes, tables)}
        self._lengths = {p.seq_id: p.start_pos for p in passes}  # a pass starts at its committed length


class TensorParallelExecutor(Executor):
    """Rank 0's executor: broadcasts each step's passes and block tables, then runs its own shard. It does not
    decide (``Executor.decides``): each rank holds a slice of the vocabulary, so the decisions run on rank 0's
    gathered logits."""

    def __init__(self, inner: Executor, comm: TPComm) -> None:
        self.inner, self.comm, self.cache = inner, comm, inner.cache
        self.is_closed = self.is_broken = False

    def forward(self, passes: Sequence[SeqPass]) -> list[PassOutput]:
        if self.is_closed or self.is_broken:
            raise TensorParallelError("the tensor-parallel workers have stopped (closed or after an error)")
        tables = [self.cache.block_table(p.seq_id) for p in passes]
        try:
            send_message(self.comm, OP_STEP, encode_step(passes, tables))
            return self.inner.forward(passes)
        except BaseException:
            self.is_broken = True  # the ranks may be mid-step: no further collective can be matched
            raise

    def keepalive(self) -> None:
        """Tell idle workers rank 0 is alive (a server calls this more often than the collective timeout)."""
        send_message(self.comm, OP_KEEPALIVE)

    def close(self) -> None:
        """Release the workers (they return from ``serve``) and leave the group with them (``TPComm.close``).
        Skipped after an error: they stop on their own. Raises ``TensorParallelError`` if a worker is gone."""
        if not (self.is_closed or self.is_broken):
            self.is_closed = True
            send_message(self.comm, OP_STOP)
            self.comm.close()


class TensorParallelWorker:
    """A rank > 0: runs rank 0's steps on its shard until rank 0 closes."""

    def __init__(self, model: NLDModel, cache: MirrorCache, executor: Executor, comm: TPComm | None = None) -> None:
        self.model, self.cache, self.executor = model, cache, executor
        self.comm = comm if comm is not None else model.comm
        self.num_steps = 0

    def serve(self, on_step: Callable[[int], None] | None = None) -> None:
        """Run rank 0's steps until it closes, then leave the group with it (``TPComm.close``). ``on_step``
        is called with the count after each step. Raises ``TensorParallelError`` when rank 0 dies or is silent
        for longer than the collective timeout."""
        while True:
            op, payload = recv_message(self.comm)
            if op == OP_STOP:
                self.comm.close()
                return
            if op == OP_KEEPALIVE:
                continue
            assert op == OP_STEP, f"unknown tensor-parallel message {op}"
            passes, tables = decode_step(payload)
            self.cache.mirror(passes, tables)
            self.executor.forward(passes)
            self.num_steps += 1
            if on_step is not None:
                on_step(self.num_steps)


_DTYPE_CODES = [torch.float32, torch.float16, torch.bfloat16]


def handshake(comm: TPComm, cfg: ModelConfig, cache: PagedKVCache) -> None:
    """Every rank has loaded its shard and agrees on the model and the pool geometry."""
    everyone = comm.all_gather_ints([cfg.num_hidden_layers, cfg.vocab_size, cfg.hidden_size, cache.num_pages,
                                     cache.page_size, _DTYPE_CODES.index(cache.k_pool.dtype)])
    if any(v != everyone[0] for v in everyone):
        names = ["layers", "vocab", "hidden", "num_pages", "page_size", "dtype"]
        raise TensorParallelConfigError("the ranks were started with different models or cache settings: " + "; ".join(
            f"rank {r}: {dict(zip(names, v))}" for r, v in enumerate(everyone)))

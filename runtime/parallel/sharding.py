"""Tensor parallelism (Megatron style) of the NLD model over N ranks, and the step broadcast that keeps
every rank's KV cache in lockstep.

Sharding (rank r of N holds the r-th contiguous slice):

| weight                         | split along              | after it                         |
|--------------------------------|--------------------------|----------------------------------|
| q/k/v_proj                     | output rows (whole heads)| attention on local heads only    |
| o_proj, drafter lora_A         | input columns            | one all-reduce per layer         |
| lora_B, norms                  | replicated               |                                  |
| gate/up_proj                   | output rows              |                                  |
| down_proj                      | input columns            | one all-reduce per layer         |
| embed_tokens                   | vocabulary rows          | one all-reduce (others give 0)   |
| diffusion_head                 | vocabulary rows          | gather of the logits to rank 0   |

The LoRA delta needs no correction: with lora_A split like o_proj's input, each rank's
``(o_r A_r^T) B^T`` is a partial sum of the full delta, summed by the same all-reduce as o_proj.
Each rank's page pool holds its ``num_key_value_heads / N`` heads of every page (same page ids on every
rank). Each rank reads only its slices of the unsharded HF files (safetensors ``get_slice``).

Execution: rank 0 owns the requests and runs the scheduler and the mode policies (runtime.engine); its
executor broadcasts each step's passes and their block tables before computing, and the other ranks
(``TensorParallelWorker``) run the same forward on their shards, writing the same pages. Only rank 0
receives logits (the full vocabulary, gathered), so sampling, acceptance and unmasking run once, on
rank 0, unchanged for every mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trimode.runtime.model.checkpoint import (LORA_DIR, CheckpointError, _check_and_load, _reset_rope, _weight_files, load_config,
                         load_lora, load_tokenizer, read_safetensors, torch_dtype)
from trimode.runtime.model.config import ModelConfig
from trimode.runtime.parallel.comm import TensorParallelConfigError, TensorParallelError, TPComm
from trimode.runtime.executors.base import Executor, make_executor
from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.model.network import LoraAdapter, NLDModel, on_meta_device
from trimode.runtime.passes import PassKind, SeqPass

if TYPE_CHECKING:
    from trimode.runtime.api import TriModeLM

_ROW_SPLIT = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
_COL_SPLIT = ("o_proj.weight", "down_proj.weight")
_VOCAB_SPLIT = ("encoder.embed_tokens.weight", "diffusion_head.weight")


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise TensorParallelConfigError naming every size that ``tp`` does not divide."""
    if not isinstance(tp, int) or tp < 1:
        raise TensorParallelConfigError(f"the tensor-parallel size must be an integer >= 1, got {tp!r}")
    sizes = {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
             "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size}
    bad = [f"{name}={value}" for name, value in sizes.items() if value % tp]
    if bad:
        ok = [n for n in range(1, cfg.num_key_value_heads + 1) if all(v % n == 0 for v in sizes.values())]
        raise TensorParallelConfigError(f"--tp {tp} does not divide {', '.join(bad)} of this model; "
                                  f"tensor-parallel sizes that work: {ok}")


def shard_span(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of ``total`` (world_size divides total)."""
    assert total % world_size == 0, (total, world_size)
    n = total // world_size
    return rank * n, (rank + 1) * n


def shard_dim(name: str) -> int | None:
    """The dimension of checkpoint tensor ``name`` split across ranks, or None if it is replicated."""
    if name in _VOCAB_SPLIT or name.endswith(_ROW_SPLIT):
        return 0
    if name.endswith(_COL_SPLIT):
        return 1
    return None


# ---- the sharded model --------------------------------------------------------------------------------

def _shard_linear(linear: nn.Linear, dim: int, rank: int, world_size: int) -> None:
    """Give ``linear`` this rank's shape (its values are loaded later)."""
    shape = list(linear.weight.shape)
    shape[dim] //= world_size
    w = linear.weight
    linear.weight = nn.Parameter(torch.empty(shape, dtype=w.dtype, device=w.device))
    linear.out_features, linear.in_features = shape


class VocabParallelEmbedding(nn.Module):
    """Rows [lo, hi) of the embedding; ids outside give zeros, and the all-reduce sums the one real row."""

    def __init__(self, vocab_size: int, hidden_size: int, comm: TPComm) -> None:
        super().__init__()
        self.vocab_start, self.vocab_end = shard_span(vocab_size, comm.rank, comm.world_size)
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, hidden_size))
        self.comm = comm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return self.comm.all_reduce(h)


class TensorParallelNLDModel(NLDModel):
    """This rank's shard of an NLD model. Build it under ``torch.device("meta")`` and load it with
    ``load_sharded_model``. ``logits`` returns the full vocabulary on rank 0 (its own slice elsewhere)."""

    def __init__(self, cfg: ModelConfig, comm: TPComm) -> None:
        check_tensor_parallel(cfg, comm.world_size)
        super().__init__(cfg)
        self.comm = comm
        r, n = comm.rank, comm.world_size
        for layer in self.encoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _shard_linear(linear, 0, r, n)
            for linear in (attn.o_proj, mlp.down_proj):
                _shard_linear(linear, 1, r, n)
            attn.hq, attn.hkv = attn.hq // n, attn.hkv // n  # view shapes: local heads
        self.encoder.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, comm)
        _shard_linear(self.diffusion_head, 0, r, n)
        self.reduce = comm.all_reduce

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.comm.gather_cat(self.diffusion_head(hidden), dim=-1)


def shard_lora(adapter: LoraAdapter, comm: TPComm) -> LoraAdapter:
    """Keep this rank's columns of every lora_A (the o_proj input it holds); lora_B stays whole."""
    lo, hi = shard_span(adapter.lora_A[0].shape[1], comm.rank, comm.world_size)
    for i, a in enumerate(adapter.lora_A):
        adapter.lora_A[i] = nn.Parameter(a.detach()[:, lo:hi].clone())
    return adapter


def load_sharded_model(path: str | Path, comm: TPComm, dtype: str | torch.dtype | None = None,
                       load_adapter: bool = True) -> TensorParallelNLDModel:
    """This rank's shard of checkpoint ``path`` on ``comm.device``, read slice by slice from the HF files."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    cfg = load_config(path)
    device = comm.device
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch_dtype(cfg.torch_dtype)
    dtype = torch_dtype(dtype)
    with on_meta_device():
        full_shapes = {k: tuple(v.shape) for k, v in NLDModel(cfg).base_state_dict().items()}
        model = TensorParallelNLDModel(cfg, comm)

    def take(name: str, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
        if name not in full_shapes:
            return None  # reported as unexpected below
        if shape != full_shapes[name]:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {shape}, config.json implies "
                                  f"{full_shapes[name]}")
        dim = shard_dim(name)
        if dim is None:
            return None
        lo, hi = shard_span(shape[dim], comm.rank, comm.world_size)
        return (slice(None),) * dim + (slice(lo, hi),)

    tensors = read_safetensors(_weight_files(path), take)
    model = model.to(dtype).to_empty(device=device)  # allocated once, in the target dtype, on the device
    _check_and_load(model, tensors, path)
    del tensors
    _reset_rope(model)
    if load_adapter and (path / LORA_DIR).is_dir():
        model.set_lora(shard_lora(load_lora(path / LORA_DIR, cfg), comm))
    return model.to(device=device, dtype=dtype).eval()


# ---- the step broadcast -------------------------------------------------------------------------------

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
    """Rank 0's executor: broadcasts each step's passes and block tables, then runs its own shard."""

    def __init__(self, inner: Executor, comm: TPComm) -> None:
        self.inner, self.comm, self.cache = inner, comm, inner.cache
        self.is_closed = self.is_broken = False

    def forward(self, passes: Sequence[SeqPass]) -> list[torch.Tensor]:
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
        """Release the workers (they return from ``serve``). Skipped after an error: they stop on their own."""
        if not (self.is_closed or self.is_broken):
            self.is_closed = True
            send_message(self.comm, OP_STOP)


class TensorParallelWorker:
    """A rank > 0: runs rank 0's steps on its shard until rank 0 closes."""

    def __init__(self, model: NLDModel, cache: MirrorCache, executor: Executor, comm: TPComm | None = None) -> None:
        self.model, self.cache, self.executor = model, cache, executor
        self.comm = comm if comm is not None else model.comm
        self.num_steps = 0

    def serve(self, on_step: Callable[[int], None] | None = None) -> None:
        while True:
            op, payload = recv_message(self.comm)
            if op == OP_STOP:
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


def load_tensor_parallel(path: str | Path, comm: TPComm, dtype: str | torch.dtype | None = None,
                         num_pages: int = 512, page_size: int = 16, max_batch_size: int = 64,
                         executor: str = "torch") -> "TriModeLM | TensorParallelWorker":
    """Load this rank's shard of ``path``. Rank 0 gets a ``TriModeLM`` (use it as usual; call
    ``lm.executor.close()`` at the end; an idle server calls ``lm.executor.keepalive()`` more often than
    the collective timeout), the other ranks a ``TensorParallelWorker`` (call ``serve()``). Every rank
    must be started with the same arguments (checked). ``executor`` names the per-rank executor."""
    model = load_sharded_model(path, comm, dtype)
    return rank_runtime(model, comm, lambda model, cache: make_executor(executor, model=model, cache=cache), path,
                        num_pages, page_size, max_batch_size)


def rank_runtime(model: NLDModel, comm: TPComm, make_inner: Callable[[NLDModel, PagedKVCache], Executor],
                 tokenizer_dir: str | Path, num_pages: int, page_size: int,
                 max_batch_size: int) -> "TriModeLM | TensorParallelWorker":
    """This rank's runtime over ``model`` (its shard, or a placeholder whose config and KV heads an engine
    executor uses): rank 0 a ``TriModeLM`` whose executor broadcasts each step before running
    ``make_inner(model, cache)``, the other ranks a ``TensorParallelWorker`` on a mirrored pool; then every
    rank checks that all agree on the model and the pool."""
    from trimode.runtime.api import TriModeLM

    cfg = model.config
    if comm.is_leader:
        lm = TriModeLM(model, load_tokenizer(tokenizer_dir, cfg), num_pages, page_size, max_batch_size,
                       executor=lambda model, cache: TensorParallelExecutor(make_inner(model, cache), comm))
        cache = lm.cache
    else:
        p = next(model.parameters())
        cache = MirrorCache(cfg.num_hidden_layers, model.encoder.layers[0].self_attn.hkv, cfg.head_dim, num_pages,
                            page_size, dtype=p.dtype, device=p.device)
        worker = TensorParallelWorker(model, cache, make_inner(model, cache), comm)
    handshake(comm, cfg, cache)
    return lm if comm.is_leader else worker


_DTYPE_CODES = [torch.float32, torch.float16, torch.bfloat16]


def handshake(comm: TPComm, cfg: ModelConfig, cache: PagedKVCache) -> None:
    """Every rank has loaded its shard and agrees on the model and the pool geometry."""
    everyone = comm.all_gather_ints([cfg.num_hidden_layers, cfg.vocab_size, cfg.hidden_size, cache.num_pages,
                                     cache.page_size, _DTYPE_CODES.index(cache.k_pool.dtype)])
    if any(v != everyone[0] for v in everyone):
        names = ["layers", "vocab", "hidden", "num_pages", "page_size", "dtype"]
        raise TensorParallelConfigError("the ranks were started with different models or cache settings: " + "; ".join(
            f"rank {r}: {dict(zip(names, v))}" for r, v in enumerate(everyone)))

"""Tensor parallelism (Megatron style) of the NLD model over N ranks: the shard plan and a rank's sharded model.

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

The step broadcast that keeps every rank's KV cache in lockstep is ``parallel.step``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trimode.runtime.model.config import ModelConfig
from trimode.runtime.model.hf_format import (LORA_DIR, CheckpointError, load_config, load_lora, load_state,
                                             read_safetensors, reset_rope, torch_dtype, weight_files)
from trimode.runtime.model.network import LoraAdapter, NLDModel, on_meta_device
from trimode.runtime.parallel.comm import TensorParallelConfigError, TPComm

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

    tensors = read_safetensors(weight_files(path), take)
    model = model.to(dtype).to_empty(device=device)  # allocated once, in the target dtype, on the device
    load_state(model, tensors, path)
    del tensors
    reset_rope(model)
    if load_adapter and (path / LORA_DIR).is_dir():
        model.set_lora(shard_lora(load_lora(path / LORA_DIR, cfg), comm))
    return model.to(device=device, dtype=dtype).eval()

"""Per-rank shards of a checkpoint's tensors as stored, for the tensor-parallel engine export (``--tp N``).

The split is the runtime's (``runtime/parallel/sharding.py``): q/k/v/gate/up by output rows (whole heads),
o_proj/down by input columns, the embedding and ``diffusion_head`` by vocabulary rows, the drafter's
lora_A by input columns (lora_B whole). Quantized linears are split in their stored form, without
dequantizing:

| stored as                          | row split (q/k/v/gate/up)          | column split (o/down)                     |
|------------------------------------|------------------------------------|-------------------------------------------|
| float ``weight`` [out, in]         | rows                               | columns                                   |
| FP8 ``weight`` [out, in] + scalars | rows; scales replicated            | columns; scales replicated                |
| INT4 ``weight`` uint8 [out/2, in]  | packed rows (2 per byte row)       | columns                                   |
| INT4 ``weight_scale`` [out, in/g]  | rows                               | whole groups of columns (g divides in/N)  |
| INT4 ``pre_quant_scale`` [in]      | replicated                         | its slice of the input                    |

FP8 KV scales (per layer, per tensor) and the norms are replicated.
"""

from __future__ import annotations

import dataclasses

import torch

from trimode.build.onnx_graph import LINEARS, ModelWeights
from trimode.runtime.model.quantized import linear_format
from trimode.runtime.parallel.comm import TensorParallelConfigError
from trimode.runtime.parallel.sharding import check_tensor_parallel, shard_dim, shard_span

LINEAR_TENSORS = ("weight", "weight_scale", "input_scale", "pre_quant_scale")  # what _shard_linear cuts


def _rows(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return t[lo:hi].clone()


def _cols(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return t[:, lo:hi].clone()


def _shard_linear(tensors: dict[str, torch.Tensor], name: str, split: str, rank: int, world: int,
                  out: dict[str, torch.Tensor]) -> None:
    """Put linear ``name``'s shard (weight and its quantization tensors) into ``out``."""
    fmt = linear_format(tensors, name)
    w = tensors[f"{name}.weight"]
    rows = w.shape[0] * (2 if fmt.kind == "int4" else 1)  # out_features
    cols = w.shape[1]  # in_features
    if split == "row":
        lo, hi = shard_span(rows, rank, world)
        if fmt.kind == "int4":
            if lo % 2:
                raise TensorParallelConfigError(f"{name}: {rows // world} output rows per rank is odd; packed int4 "
                                                f"holds two rows per byte")
            out[f"{name}.weight"] = _rows(w, lo // 2, hi // 2)
            out[f"{name}.weight_scale"] = _rows(tensors[f"{name}.weight_scale"], lo, hi)
            if fmt.has_pre_quant_scale:
                out[f"{name}.pre_quant_scale"] = tensors[f"{name}.pre_quant_scale"].clone()
        else:
            out[f"{name}.weight"] = _rows(w, lo, hi)
    else:
        lo, hi = shard_span(cols, rank, world)
        out[f"{name}.weight"] = _cols(w, lo, hi)
        if fmt.kind == "int4":
            group = fmt.group_size
            if lo % group or hi % group:
                raise TensorParallelConfigError(
                    f"{name}: each rank's {cols // world} input columns are not whole int4 groups of {group}; "
                    f"a w4a16 build with --tp {world} needs in_features / {world} to be a multiple of the group size")
            out[f"{name}.weight_scale"] = _cols(tensors[f"{name}.weight_scale"], lo // group, hi // group)
            if fmt.has_pre_quant_scale:
                out[f"{name}.pre_quant_scale"] = tensors[f"{name}.pre_quant_scale"][lo:hi].clone()
    for suffix in ("weight_scale", "input_scale"):  # FP8: per-tensor scalars, the same on every rank
        key = f"{name}.{suffix}"
        if key in tensors and key not in out:
            out[key] = tensors[key].clone()


def shard_weights(weights: ModelWeights, rank: int, world: int) -> ModelWeights:
    """Rank ``rank`` of ``world``'s share of ``weights`` (config unchanged: the graph divides the heads)."""
    cfg = weights.config
    check_tensor_parallel(cfg, world)
    if world == 1:
        return weights
    t = weights.tensors
    out: dict[str, torch.Tensor] = {}
    linears = [f"encoder.layers.{i}.{lin}" for i in range(cfg.num_hidden_layers) for lin in LINEARS]
    linears += ["diffusion_head"] if "diffusion_head.weight" in t else []
    for name in linears:  # the runtime's split: dim 0 = output rows (or vocabulary), dim 1 = input columns
        _shard_linear(t, name, "row" if shard_dim(f"{name}.weight") == 0 else "col", rank, world, out)
    lo, hi = shard_span(cfg.vocab_size, rank, world)
    out["encoder.embed_tokens.weight"] = _rows(t["encoder.embed_tokens.weight"], lo, hi)
    linear_keys = {f"{name}.{suffix}" for name in linears for suffix in LINEAR_TENSORS}
    for key, value in t.items():  # norms, KV scales (k_proj.k_scale, v_proj.v_scale): replicated
        if key not in out and key not in linear_keys:
            out[key] = value
    lora = None
    if weights.lora is not None:
        lo, hi = shard_span(cfg.num_attention_heads * cfg.head_dim, rank, world)
        lora = [(a[:, lo:hi].clone(), b) for a, b in weights.lora]
    return dataclasses.replace(weights, tensors=out, lora=lora, tp_rank=rank, tp_size=world)

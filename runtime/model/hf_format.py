"""The NLD checkpoint format on disk (Hugging Face layout): file names, safetensors reading (whole or by slice),
``config.json``, the base weights' name/shape/dtype check and the PEFT drafter adapter.

A directory holds ``config.json`` (and optionally ``generation_config.json``, whose ``eos_token_id`` adds to
config.json's), ``model.safetensors`` or shards listed in ``model.safetensors.index.json``
(tensor names ``encoder.*`` and ``diffusion_head.weight``; bf16, fp16 or fp32), optionally ``tokenizer.json``
and a PEFT drafter adapter in ``linear_spec_lora/`` (``adapter_config.json`` + ``adapter_model.safetensors``,
LoRA on ``o_proj``, any rank and alpha). Every inconsistency is a ``CheckpointError`` naming the file and the
tensors involved. The loaders (``checkpoint``, ``quantized``, ``parallel.sharding``) are built on these.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from trimode.runtime.model.config import ConfigError, ModelConfig
from trimode.runtime.model.network import LoraAdapter, NLDModel
from trimode.runtime.model.rope import rope_frequencies

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LORA_DIR = "linear_spec_lora"
GENERATION_CONFIG_FILE = "generation_config.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LORA_KEY = re.compile(r"layers\.(\d+)\.self_attn\.o_proj\.lora_([AB])(?:\.[^.]+)?\.weight$")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded, with the reason."""


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not supported; allowed: {sorted(_DTYPES)}") from None


# ---- reading ------------------------------------------------------------------------------------------

def weight_files(path: Path) -> list[Path]:
    """The safetensors files of checkpoint ``path`` (the shards its index lists, or the single file)."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist: {missing}")
        return files
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    raise CheckpointError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")


# take(name, full_shape) -> the index of the part of the tensor to read, or None for all of it
TakeFn = Callable[[str, tuple[int, ...]], "tuple[slice, ...] | None"]


def read_safetensors(files: list[Path], take: TakeFn | None = None) -> dict[str, torch.Tensor]:
    """All tensors of ``files`` by name; with ``take``, only the part of each tensor it selects is read
    (tensor-parallel ranks read their slices of the unsharded files this way)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name in tensors:
                        raise CheckpointError(f"tensor {name!r} appears in more than one shard ({file.name})")
                    index = None
                    if take is not None:
                        part = f.get_slice(name)
                        index = take(name, tuple(part.get_shape()))
                    tensors[name] = f.get_tensor(name) if index is None else part[index]
        except (SafetensorError, OSError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None
    return tensors


def load_state(model: NLDModel, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy ``tensors`` into ``model``'s base weights after checking names, shapes and dtypes (CheckpointError)."""
    expected = model.base_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(f"{where}: " + "; ".join(parts))
    for name, param in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(param.shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(got.shape)}, "
                                  f"config.json implies {tuple(param.shape)}")
        if got.dtype not in _DTYPES.values():
            raise CheckpointError(f"{where}: tensor {name!r} has dtype {got.dtype}; allowed: bf16, fp16, fp32")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in tensors:
                param.copy_(tensors[name].to(param.dtype))


def load_lora(path: Path, cfg: ModelConfig) -> LoraAdapter:
    """Read a PEFT LoRA adapter on o_proj from ``path`` (a ``linear_spec_lora`` folder)."""
    config_file = path / "adapter_config.json"
    try:
        acfg = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file} could not be read: {e}") from None
    if acfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{config_file}: peft_type {acfg.get('peft_type')!r} is not supported (LORA only)")
    if acfg.get("use_rslora") or acfg.get("use_dora"):
        raise CheckpointError(f"{config_file}: rsLoRA / DoRA adapters are not supported")
    targets = acfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if targets != ["o_proj"] and not (isinstance(targets, list) and set(targets) == {"o_proj"}):
        raise CheckpointError(f"{config_file}: target_modules {targets} is not supported (o_proj only)")
    rank, alpha = int(acfg["r"]), float(acfg.get("lora_alpha", acfg["r"]))
    tensors = read_safetensors([path / "adapter_model.safetensors"])
    adapter = LoraAdapter(cfg.num_hidden_layers, cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, rank, alpha)
    seen: set[tuple[int, str]] = set()
    for name, tensor in tensors.items():
        m = _LORA_KEY.search(name)
        if m is None:
            raise CheckpointError(f"{path}: unexpected adapter tensor {name!r} (only o_proj lora_A/lora_B)")
        layer, which = int(m.group(1)), m.group(2)
        if layer >= cfg.num_hidden_layers:
            raise CheckpointError(f"{path}: adapter tensor {name!r} names layer {layer}, "
                                  f"the model has {cfg.num_hidden_layers}")
        target = (adapter.lora_A if which == "A" else adapter.lora_B)[layer]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: adapter tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(target.shape)} (r={rank})")
        with torch.no_grad():
            target.copy_(tensor.float())
        seen.add((layer, which))
    missing = [(i, w) for i in range(cfg.num_hidden_layers) for w in "AB" if (i, w) not in seen]
    if missing:
        raise CheckpointError(f"{path}: adapter lacks tensors for (layer, A/B) {missing[:8]}")
    return adapter


def load_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of checkpoint ``path``: ``config.json``, with ``eos_token_id`` widened to the union of
    config.json's and ``generation_config.json``'s end-of-sequence ids (each one id or a list; config.json's
    first, in order), so generation stops at every id either file declares. Raises ``CheckpointError`` naming
    the file for a missing, unreadable or unsupported config."""
    path = Path(path)
    try:
        cfg = ModelConfig.from_file(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    eos_ids = cfg.eos_token_ids + tuple(i for i in generation_eos_token_ids(path) if i not in cfg.eos_token_ids)
    if eos_ids == cfg.eos_token_ids:
        return cfg
    try:
        return cfg.replace(eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids)
    except ConfigError as e:
        raise CheckpointError(f"{path / GENERATION_CONFIG_FILE}: {e}") from None


def generation_eos_token_ids(path: str | Path) -> tuple[int, ...]:
    """The ``eos_token_id`` of ``path``'s ``generation_config.json`` (Hugging Face ``GenerationConfig``: one id,
    a list, or null) as a tuple; () without the file. Raises ``CheckpointError`` for unreadable JSON or ids that
    are not integers."""
    file = Path(path) / GENERATION_CONFIG_FILE
    if not file.is_file():
        return ()
    try:
        value = json.loads(file.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{file} is not a JSON object: {e}") from None
    ids = () if value is None else tuple(value) if isinstance(value, list) else (value,)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(f"{file}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return ids


def reset_rope(model: NLDModel) -> None:
    """Recompute the model's RoPE inverse frequencies (a buffer that loading on meta leaves unset)."""
    inv_freq, _ = rope_frequencies(model.config.rope, model.config.head_dim)
    model.inv_freq = inv_freq

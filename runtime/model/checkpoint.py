"""Loading and writing NLD checkpoint directories (the format: ``hf_format``): the model of a checkpoint
(plain, or a ModelOpt unified checkpoint through ``quantized``), its tokenizer, writing checkpoints and PEFT
adapters, and random checkpoints of any config for tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from trimode.runtime.model.config import ModelConfig
from trimode.runtime.model.hf_format import (INDEX_FILE, LORA_DIR, SINGLE_FILE, CheckpointError, load_config,
                                             load_lora, load_state, read_safetensors, reset_rope, torch_dtype,
                                             weight_files)
from trimode.runtime.model.network import LoraAdapter, NLDModel, on_meta_device
from trimode.runtime.model.quantized import is_quantized_checkpoint, load_quantized_model
from trimode.runtime.model.tokenizer import Tokenizer, TokenizerError, word_level_tokenizer

__all__ = ["INDEX_FILE", "LORA_DIR", "SINGLE_FILE", "CheckpointError", "load_config", "load_model", "load_tokenizer",
           "save_checkpoint", "save_lora", "torch_dtype", "write_random_checkpoint"]


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               load_adapter: bool = True) -> NLDModel:
    """Build the model of checkpoint ``path`` and load its weights (and its drafter LoRA if present).

    ``dtype`` defaults to float32 on CPU and to the checkpoint's dtype elsewhere.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    if is_quantized_checkpoint(path):  # ModelOpt unified checkpoint (build/quantize.py)
        return load_quantized_model(path, dtype=dtype, device=device, load_adapter=load_adapter)
    cfg = load_config(path)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch_dtype(cfg.torch_dtype)
    tensors = read_safetensors(weight_files(path))
    with on_meta_device():  # no random init of weights that are overwritten next
        model = NLDModel(cfg)
    model = model.to_empty(device="cpu")
    load_state(model, tensors, path)
    reset_rope(model)
    if load_adapter and (path / LORA_DIR).is_dir():
        model.set_lora(load_lora(path / LORA_DIR, cfg))
    return model.to(device=device, dtype=torch_dtype(dtype)).eval()


def load_tokenizer(path: str | Path, cfg: ModelConfig | None = None) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None if it has none; refuses one whose vocabulary exceeds the model's."""
    path = Path(path)
    if not (path / "tokenizer.json").exists():
        return None
    cfg = cfg or load_config(path)
    try:
        tok = Tokenizer.from_dir(path)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tok.vocab_size} tokens but config.json vocab_size is "
                              f"{cfg.vocab_size}: tokenizer and checkpoint do not belong together")
    if tok.mask_token is not None and tok.token_to_id(tok.mask_token) not in (None, cfg.mask_token_id):
        raise CheckpointError(f"{path}: the tokenizer's mask token {tok.mask_token!r} has id "
                              f"{tok.token_to_id(tok.mask_token)}, config.json mask_token_id is {cfg.mask_token_id}")
    return tok


# ---- writing ------------------------------------------------------------------------------------------

def save_checkpoint(model: NLDModel, path: str | Path, dtype: str = "bfloat16", max_shard_bytes: int | None = None,
                    tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` as an NLD checkpoint directory (sharded when ``max_shard_bytes`` is given)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config.replace(torch_dtype=dtype)
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tensors = {k: v.detach().to("cpu", torch_dtype(dtype)).contiguous() for k, v in model.base_state_dict().items()}
    if max_shard_bytes is None:
        save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2) + "\n")
    if model.lora is not None:
        save_lora(model.lora, path / LORA_DIR)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def save_lora(adapter: LoraAdapter, path: str | Path, base_model: str = "") -> None:
    """Write ``adapter`` in PEFT format (fp32 tensors, PEFT key names)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": None, "r": adapter.rank, "lora_alpha": adapter.alpha,
              "target_modules": ["o_proj"], "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "inference_mode": True,
              "base_model_name_or_path": base_model}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {}
    for i, (a, b) in enumerate(zip(adapter.lora_A, adapter.lora_B)):
        prefix = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        tensors[f"{prefix}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})


def init_random_weights(model: NLDModel, seed: int, std: float = 0.02) -> NLDModel:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def write_random_checkpoint(path: str | Path, cfg: ModelConfig, seed: int = 0, dtype: str = "float32",
                            max_shard_bytes: int | None = None, lora_rank: int | None = None,
                            lora_alpha: float | None = None, with_tokenizer: bool = True) -> Path:
    """Write a random checkpoint of ``cfg`` in the real NLD format (tests and examples use it).

    Random weights use a larger init than training would so that logits are far from uniform and greedy
    decoding is not decided by rounding noise.
    """
    model = init_random_weights(NLDModel(cfg), seed, std=0.25)
    if lora_rank:
        adapter = LoraAdapter(cfg.num_hidden_layers, cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size,
                              lora_rank, lora_alpha if lora_alpha is not None else 2.0 * lora_rank)
        init_random_weights(adapter, seed + 1, std=0.2)
        model.set_lora(adapter)
    tokenizer = None
    if with_tokenizer:
        special = {cfg.mask_token_id: "<|mask|>"}
        if cfg.bos_token_id is not None:
            special[cfg.bos_token_id] = "<s>"
        for i, eos in enumerate(cfg.eos_token_ids):  # distinct names: one vocabulary entry per id
            special[eos] = "</s>" if i == 0 else f"<|eos_{i}|>"
        tokenizer = word_level_tokenizer(cfg.vocab_size, special)
    return save_checkpoint(model, path, dtype=dtype, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer)

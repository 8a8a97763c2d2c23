"""Reading and writing NLD checkpoint directories in the Hugging Face layout.

A directory holds ``config.json``, ``model.safetensors`` or shards listed in ``model.safetensors.index.json``
(tensor names ``encoder.*`` and ``diffusion_head.weight``; bf16, fp16 or fp32), optionally ``tokenizer.json``
and a PEFT drafter adapter in ``linear_spec_lora/`` (``adapter_config.json`` + ``adapter_model.safetensors``,
LoRA on ``o_proj``, any rank and alpha). Every inconsistency is a ``CheckpointError`` naming the file and
the tensors involved.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from trimode.runtime.model.config import ConfigError, ModelConfig
from trimode.runtime.model.network import LoraAdapter, NLDModel, on_meta_device
from trimode.runtime.model.tokenizer import Tokenizer, TokenizerError, word_level_tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LORA_DIR = "linear_spec_lora"
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

def _weight_files(path: Path) -> list[Path]:
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


def _check_and_load(model: NLDModel, tensors: dict[str, torch.Tensor], where: Path) -> None:
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
    try:
        return ModelConfig.from_file(Path(path) / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               load_adapter: bool = True) -> NLDModel:
    """Build the model of checkpoint ``path`` and load its weights (and its drafter LoRA if present).

    ``dtype`` defaults to float32 on CPU and to the checkpoint's dtype elsewhere.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    if (path / "hf_quant_config.json").is_file():  # ModelOpt unified checkpoint (build/quantize.py)
        from trimode.runtime.model.quantized import load_quantized_model

        return load_quantized_model(path, dtype=dtype, device=device, load_adapter=load_adapter)
    cfg = load_config(path)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch_dtype(cfg.torch_dtype)
    tensors = read_safetensors(_weight_files(path))
    with on_meta_device():  # no random init of weights that are overwritten next
        model = NLDModel(cfg)
    model = model.to_empty(device="cpu")
    _check_and_load(model, tensors, path)
    _reset_rope(model)
    if load_adapter and (path / LORA_DIR).is_dir():
        model.set_lora(load_lora(path / LORA_DIR, cfg))
    return model.to(device=device, dtype=torch_dtype(dtype)).eval()


def _reset_rope(model: NLDModel) -> None:
    from trimode.runtime.model.rope import rope_frequencies

    inv_freq, _ = rope_frequencies(model.config.rope, model.config.head_dim)
    model.inv_freq = inv_freq


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
        for eos in cfg.eos_token_ids:
            special[eos] = "</s>"
        tokenizer = word_level_tokenizer(cfg.vocab_size, special)
    return save_checkpoint(model, path, dtype=dtype, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer)

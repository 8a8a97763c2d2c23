"""Loading ModelOpt unified HF checkpoints (``hf_quant_config.json``) of NLD models.

Two consumers: the torch executor gets an ``NLDModel`` with dequantized weights (``load_quantized_model``),
and the graph export reads the packed tensors as they are (``read_quantized_checkpoint`` + ``linear_format``).

Formats (what ``build/quantize.py`` writes with ModelOpt 0.47):

- FP8: ``<linear>.weight`` float8_e4m3fn [out, in], ``weight_scale`` and ``input_scale`` fp32 scalars:
  W = w * weight_scale; the input is quantized statically, x_q = fp8(x / input_scale) * input_scale.
- INT4 AWQ (W4A16_AWQ): ``<linear>.weight`` uint8 [out / 2, in] holding rows 2j (low nibble) and 2j+1 (high
  nibble) as signed int4; ``weight_scale`` fp32 [out, in / group]; optional ``pre_quant_scale`` [in] that
  multiplies the input (ModelOpt folds it into the preceding RMSNorm weight where there is one).
- FP8 KV cache: ``self_attn.k_proj.k_scale`` / ``self_attn.v_proj.v_scale`` (amax / 448, clamped to >= 1).

With ``simulate_activations`` (default) FP8 linears quantize their input, and an FP8-KV model its post-RoPE K
and V, the same way the engine graphs' Q/DQ nodes do (the pool then holds the dequantized values), so the torch
executor computes what the engines compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trimode.runtime.model.config import ModelConfig
from trimode.runtime.model.hf_format import (LORA_DIR, CheckpointError, load_config, load_lora, load_state,
                                             read_safetensors, reset_rope, torch_dtype, weight_files)
from trimode.runtime.model.network import NLDModel, on_meta_device

QUANT_CONFIG_FILE = "hf_quant_config.json"
SUPPORTED_ALGOS = ("FP8", "W4A16_AWQ", "MIXED_PRECISION")
FP8_MAX = 448.0


@dataclass(frozen=True)
class QuantConfig:
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    exclude_modules: tuple[str, ...] = ()
    layers: dict = field(default_factory=dict)  # MIXED_PRECISION: module -> {"quant_algo", "group_size", ...}


@dataclass(frozen=True)
class LinearFormat:
    """How one linear is stored: ``kind`` is "float", "fp8" or "int4"."""

    kind: str
    group_size: int = 0
    has_pre_quant_scale: bool = False


def is_quantized_checkpoint(path: str | Path) -> bool:
    return (Path(path) / QUANT_CONFIG_FILE).is_file()


def read_quant_config(path: str | Path) -> QuantConfig:
    file = Path(path) / QUANT_CONFIG_FILE
    try:
        q = json.loads(file.read_text())["quantization"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{file} is not a ModelOpt quantization config: {e}") from None
    algo = q.get("quant_algo")
    if algo is not None and algo not in SUPPORTED_ALGOS:
        raise CheckpointError(f"{file}: quant_algo {algo!r} is not supported; supported: {SUPPORTED_ALGOS}")
    layers = q.get("quantized_layers") or {}
    for name, spec in layers.items():
        if spec.get("quant_algo") not in ("FP8", "W4A16_AWQ"):
            raise CheckpointError(f"{file}: layer {name} has quant_algo {spec.get('quant_algo')!r}; "
                                  f"supported: FP8, W4A16_AWQ")
    kv = q.get("kv_cache_quant_algo")
    if kv not in (None, "FP8"):
        raise CheckpointError(f"{file}: kv_cache_quant_algo {kv!r} is not supported (FP8 only)")
    return QuantConfig(algo, kv, tuple(q.get("exclude_modules") or ()), layers)


def read_quantized_checkpoint(path: str | Path) -> tuple[ModelConfig, QuantConfig, dict[str, torch.Tensor]]:
    """Config, quantization config and the raw (packed) tensors of a quantized checkpoint."""
    path = Path(path)
    return load_config(path), read_quant_config(path), read_safetensors(weight_files(path))


def linear_format(tensors: dict[str, torch.Tensor], name: str) -> LinearFormat:
    """The storage format of linear ``name`` (e.g. ``encoder.layers.0.mlp.up_proj``), from its tensors."""
    w = tensors[f"{name}.weight"]
    if w.dtype == torch.float8_e4m3fn:
        return LinearFormat("fp8")
    if w.dtype == torch.uint8:
        scale = tensors[f"{name}.weight_scale"]
        return LinearFormat("int4", w.shape[1] // scale.shape[1], f"{name}.pre_quant_scale" in tensors)
    return LinearFormat("float")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out / 2, in] (ModelOpt: rows 2j low nibble, 2j+1 high nibble) -> int8 [out, in] in [-8, 7]."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    both = torch.stack([low, high], dim=1).reshape(-1, packed.shape[1])  # [out, in]
    return (both ^ 8) - 8  # sign-extend 4-bit two's complement


def dequantize_weight(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The fp32 weight [out, in] that linear ``name`` computes with (pre_quant_scale folded into its columns)."""
    fmt = linear_format(tensors, name)
    w = tensors[f"{name}.weight"]
    if fmt.kind == "fp8":
        return w.float() * tensors[f"{name}.weight_scale"].float()
    if fmt.kind == "int4":
        q = unpack_int4(w).float()
        scale = tensors[f"{name}.weight_scale"].float().repeat_interleave(fmt.group_size, dim=1)
        out = q * scale
        if fmt.has_pre_quant_scale:
            out = out * tensors[f"{name}.pre_quant_scale"].float()[None, :]
        return out
    return w.float()


def fp8_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x -> dequant(quant_fp8(x / scale)) * scale, saturating, round-to-nearest-even (ONNX QuantizeLinear)."""
    s = scale.to(torch.float32)
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


class FP8InputLinear(nn.Linear):
    """A linear whose input is FP8-quantized with a static scale (the engines' activation Q/DQ)."""

    def __init__(self, in_features: int, out_features: int, input_scale: torch.Tensor) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.register_buffer("input_scale", input_scale.float().reshape(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(fp8_fake_quant(x, self.input_scale), self.weight)


class KVQuantNLDModel(NLDModel):
    """An NLD model whose attention sees (and whose cache keeps) FP8-quantized K and V, per-layer scales."""

    def forward_hidden(self, input_ids, positions, attend, lora_mask=None):  # noqa: ANN001
        def attend_quantized(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attend(i, q, fp8_fake_quant(k, self.k_scales[i]), fp8_fake_quant(v, self.v_scales[i]))

        return super().forward_hidden(input_ids, positions, attend_quantized, lora_mask)


def _linear_names(model: NLDModel) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def load_quantized_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                         load_adapter: bool = True, simulate_activations: bool = True) -> NLDModel:
    """An ``NLDModel`` of quantized checkpoint ``path`` with dequantized weights (fp32 on CPU by default)."""
    path = Path(path)
    cfg, qcfg, raw = read_quantized_checkpoint(path)
    simulate_kv = simulate_activations and qcfg.kv_cache_quant_algo == "FP8"
    with on_meta_device():  # no initializers: the weights are loaded next
        model = (KVQuantNLDModel if simulate_kv else NLDModel)(cfg)
    model = model.to_empty(device="cpu")
    tensors: dict[str, torch.Tensor] = {}
    input_scales: dict[str, torch.Tensor] = {}
    kv_scales: dict[str, float] = {}
    linears = set(_linear_names(model))
    for name, t in raw.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("k_scale", "v_scale"):
            kv_scales[name] = float(t)
        elif leaf == "input_scale":
            input_scales[module] = t
        elif leaf in ("weight_scale", "pre_quant_scale", "weight_scale_2"):
            if module not in linears:
                raise CheckpointError(f"{path}: quantization tensor {name!r} belongs to no linear layer")
        elif leaf == "weight" and module in linears:
            tensors[name] = dequantize_weight(raw, module)
        else:
            tensors[name] = t
    load_state(model, tensors, path)
    if simulate_activations:
        for module, scale in input_scales.items():
            parent_name, _, child = module.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
            new = FP8InputLinear(old.in_features, old.out_features, scale)
            new.weight = old.weight
            setattr(parent, child, new)
    if simulate_kv:
        for which in ("k", "v"):
            scales = [kv_scales[f"encoder.layers.{i}.self_attn.{which}_proj.{which}_scale"]
                      for i in range(cfg.num_hidden_layers)]
            model.register_buffer(f"{which}_scales", torch.tensor(scales, dtype=torch.float32), persistent=False)
    reset_rope(model)
    model.quant_config = qcfg  # what the runtime and the manifest report
    model.kv_cache_scales = kv_scales
    if load_adapter and (path / LORA_DIR).is_dir():
        model.set_lora(load_lora(path / LORA_DIR, cfg))
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch_dtype(cfg.torch_dtype)
    return model.to(device=device, dtype=torch_dtype(dtype)).eval()

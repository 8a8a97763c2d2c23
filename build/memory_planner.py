"""Per-GPU memory plan of a tri-mode model under tensor parallelism: weights, drafter LoRA, activations,
reserve, and what is left for KV pages (the budget ``build_engine.py --target/--tp`` sizes the pool from).

    python -m trimode.build.memory_planner --model 8B --tp 2 --gpu-gb 80
    python -m trimode.build.memory_planner --model path/to/checkpoint --tp 1 2 4 --gpu-gb 24 --kv-dtype fp8

Accounting per GPU for tensor-parallel size N (runtime/parallel/sharding.py): q/k/v/o, gate/up/down,
embed_tokens and diffusion_head are split N ways; norms and lora_B are replicated; lora_A is split; each
GPU holds num_key_value_heads / N heads of every KV page. ``dtype`` is the storage of the decoder's linear
layers (``fp8``, ``int4`` = the fp8 and w4a16 recipes, int4 with one fp16 scale per group of 128);
embeddings, head, norms and LoRA stay 16-bit then. Activations are an estimate for ``max_num_tokens``
tokens per forward plus rank 0's gathered fp32 logits for ``max_num_logits`` rows. Sizes in GiB (2^30).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from trimode.runtime.model.config import ModelConfig, RopeConfig
from trimode.runtime.parallel.comm import TensorParallelConfigError
from trimode.runtime.parallel.sharding import check_tensor_parallel
from trimode.runtime.settings import DEFAULTS

GiB = 1 << 30
WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "int4": 0.5 + 2 / 128}
KV_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


def _reference(hidden: int, layers: int, intermediate: int) -> ModelConfig:
    return ModelConfig(vocab_size=131072, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       mask_token_id=100, bos_token_id=1, eos_token_id=11, block_size=32,
                       rope=RopeConfig(rope_type="yarn", rope_theta=1e6, factor=16.0,
                                       original_max_position_embeddings=16384, llama_4_scaling_beta=0.1))


# The released Nemotron-Labs-Diffusion sizes (docs: spec/model.md section 1; 14B dims from Ministral-3-14B).
REFERENCE_CONFIGS: dict[str, ModelConfig] = {
    "3B": _reference(3072, 26, 9216),
    "8B": _reference(4096, 34, 14336),
    "14B": _reference(5120, 40, 16384),
}


@dataclass(frozen=True)
class MemoryPlan:
    """One GPU's share (bytes) for a tensor-parallel size; ``kv_budget_bytes`` < 0 means it does not fit."""

    model: str
    tp: int
    dtype: str
    kv_dtype: str
    gpu_memory_bytes: int
    num_params: int
    sharded_weight_bytes: int      # split N ways (linears, embedding, head)
    replicated_weight_bytes: int   # on every GPU (norms)
    lora_bytes: int
    activation_bytes: int
    reserve_bytes: int
    kv_bytes_per_token: int        # this GPU's share: 2 (K, V) x layers x kv_heads / N x head_dim x kv bytes
    kv_budget_bytes: int
    page_size: int
    context_length: int

    @property
    def weight_bytes(self) -> int:
        return self.sharded_weight_bytes + self.replicated_weight_bytes + self.lora_bytes

    @property
    def fits(self) -> bool:
        return self.kv_budget_bytes >= self.kv_bytes_per_token * self.context_length

    @property
    def num_kv_tokens(self) -> int:
        return max(0, self.kv_budget_bytes) // self.kv_bytes_per_token

    @property
    def num_pages(self) -> int:
        return self.num_kv_tokens // self.page_size

    @property
    def max_sequences(self) -> int:
        """Sequences of ``context_length`` tokens the pool holds at once."""
        return self.num_pages // math.ceil(self.context_length / self.page_size)

    def to_dict(self) -> dict:
        return {**asdict(self), "weight_bytes": self.weight_bytes, "fits": self.fits,
                "num_kv_tokens": self.num_kv_tokens, "num_pages": self.num_pages, "max_sequences": self.max_sequences}

    def format(self) -> str:
        g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
        rows = [
            f"{self.model}: {self.num_params / 1e9:.2f} B params, tp {self.tp}, weights {self.dtype}, "
            f"KV {self.kv_dtype}, {self.gpu_memory_bytes / GiB:g} GiB per GPU",
            f"  weights per GPU       {g(self.sharded_weight_bytes + self.replicated_weight_bytes)}"
            f"   (all GPUs {g(self.sharded_weight_bytes * self.tp + self.replicated_weight_bytes * self.tp).strip()})",
            f"  drafter LoRA          {g(self.lora_bytes)}",
            f"  activations (est.)    {g(self.activation_bytes)}",
            f"  reserve               {g(self.reserve_bytes)}",
            f"  KV budget per GPU     {g(self.kv_budget_bytes)}",
            f"  KV per token per GPU  {self.kv_bytes_per_token / 1024:8.1f} KiB",
            f"  KV tokens             {self.num_kv_tokens:>8d}   ({self.num_pages} pages of {self.page_size})",
            f"  sequences of {self.context_length} tokens: {self.max_sequences}"
            + ("" if self.fits else "   DOES NOT FIT: not even one sequence's KV"),
        ]
        return "\n".join(rows)


def plan_memory(config: ModelConfig, tp: int = 1, dtype: str = "bfloat16", kv_dtype: str = "bfloat16",
                gpu_memory_gb: float = 80.0, page_size: int = DEFAULTS.page_size, context_length: int = 32768,
                lora_rank: int | None = 128, max_num_tokens: int = 8192, max_num_logits: int = 1024,
                reserve_gb: float = 2.0, model_name: str = "model") -> MemoryPlan:
    """Per-GPU budgets of ``config`` over ``tp`` GPUs of ``gpu_memory_gb`` GiB (see the module docstring)."""
    check_tensor_parallel(config, tp)
    if dtype not in WEIGHT_BYTES:
        raise ValueError(f"dtype must be one of {sorted(WEIGHT_BYTES)}, got {dtype!r}")
    if kv_dtype not in KV_BYTES:
        raise ValueError(f"kv_dtype must be one of {sorted(KV_BYTES)}, got {kv_dtype!r}")
    if gpu_memory_gb <= 0 or page_size < 1 or context_length < 1:
        raise ValueError("gpu_memory_gb, page_size and context_length must be positive")
    c = config
    h, d, layers, v = c.hidden_size, c.head_dim, c.num_hidden_layers, c.vocab_size
    q_out, kv_out = c.num_attention_heads * d, c.num_key_value_heads * d
    linear_params = layers * (h * q_out + 2 * h * kv_out + q_out * h + 3 * h * c.intermediate_size)
    embed_params = 2 * v * h  # embed_tokens + diffusion_head (untied)
    norm_params = (2 * layers + 1) * h
    wide = WEIGHT_BYTES[dtype] if dtype in ("float32", "bfloat16", "float16") else 2.0  # 16-bit beside fp8/int4
    sharded = (linear_params * WEIGHT_BYTES[dtype] + embed_params * wide) / tp
    replicated = norm_params * wide
    lora = 0.0 if not lora_rank else layers * lora_rank * (q_out / tp + h) * wide
    act_bytes = 2.0 if dtype != "float32" else 4.0
    per_token = act_bytes * (4 * h + (q_out + 2 * kv_out) / tp + 3 * c.intermediate_size / tp + v / tp)
    activations = max_num_tokens * per_token + max_num_logits * v * 4.0  # + rank 0's gathered fp32 logits
    reserve = reserve_gb * GiB
    kv_per_token = 2 * layers * (c.num_key_value_heads // tp) * d * KV_BYTES[kv_dtype]
    gpu = int(gpu_memory_gb * GiB)
    budget = gpu - sharded - replicated - lora - activations - reserve
    return MemoryPlan(model_name, tp, dtype, kv_dtype, gpu, linear_params + embed_params + norm_params,
                      int(sharded), int(replicated), int(lora), int(activations), int(reserve), kv_per_token,
                      int(budget), page_size, context_length)


def smallest_tp(config: ModelConfig, **kw) -> int | None:
    """The smallest tensor-parallel size that divides the model and fits one sequence, or None."""
    for tp in range(1, config.num_key_value_heads + 1):
        try:
            if plan_memory(config, tp, **kw).fits:
                return tp
        except TensorParallelConfigError:  # a size that does not divide the model
            continue
    return None


def resolve_model(name: str) -> tuple[str, ModelConfig]:
    if name.upper() in REFERENCE_CONFIGS:
        return name.upper(), REFERENCE_CONFIGS[name.upper()]
    path = Path(name)
    if (path / "config.json").exists():
        return path.name, ModelConfig.from_file(path / "config.json")
    raise ValueError(f"--model must be one of {list(REFERENCE_CONFIGS)} or a checkpoint directory, got {name!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trimode.build.memory_planner", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="8B", help=f"{'/'.join(REFERENCE_CONFIGS)} or a checkpoint directory")
    ap.add_argument("--tp", type=int, nargs="+", default=[1], help="tensor-parallel size(s)")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="memory per GPU in GiB")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(WEIGHT_BYTES))
    ap.add_argument("--kv-dtype", default="bfloat16", choices=sorted(KV_BYTES))
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--context", type=int, default=32768, help="tokens per sequence, for the sequence count")
    ap.add_argument("--lora-rank", type=int, default=128, help="drafter LoRA rank (0: none)")
    ap.add_argument("--max-num-tokens", type=int, default=8192, help="tokens per forward (activations)")
    ap.add_argument("--reserve-gb", type=float, default=2.0, help="CUDA context, NCCL buffers, allocator slack")
    args = ap.parse_args(argv)
    try:
        name, cfg = resolve_model(args.model)
        plans = [plan_memory(cfg, tp, args.dtype, args.kv_dtype, args.gpu_gb, args.page_size, args.context,
                             args.lora_rank, args.max_num_tokens, reserve_gb=args.reserve_gb, model_name=name)
                 for tp in args.tp]
    except (ValueError, RuntimeError) as e:
        ap.error(str(e))
    for plan in plans:
        print(plan.format())
        if not plan.fits:
            need = smallest_tp(cfg, dtype=args.dtype, kv_dtype=args.kv_dtype, gpu_memory_gb=args.gpu_gb,
                               page_size=args.page_size, context_length=args.context, lora_rank=args.lora_rank,
                               max_num_tokens=args.max_num_tokens, reserve_gb=args.reserve_gb)
            print(f"  -> needs --tp {need}" if need else "  -> does not fit at any tensor-parallel size")
    print(json.dumps([p.to_dict() for p in plans]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The NLD model configuration, read from a checkpoint's ``config.json``.

One frozen dataclass validated once (``ModelConfig``), plus its RoPE sub-config. Keys that Hugging Face
writes but that do not change the computation (``auto_map``, ``use_cache``, ``dlm_paradigm``, ...) are
accepted and kept in ``extra``; keys that would change the computation in a way we do not implement
(sliding windows, biases, other activations) are refused with a clear error.

``null`` follows Hugging Face's Mistral / Ministral3 configs (``MistralConfig.__post_init__``): an optional key
set to ``null`` means "not set" and takes the value the key has when it is absent: ``head_dim`` = hidden_size //
num_attention_heads, ``num_key_value_heads`` = num_attention_heads, the RoPE keys their defaults, and so on;
where ``null`` is itself a value (``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``sliding_window``) it
keeps its meaning (no such token, no window). A required key set to ``null`` is refused, naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "nemotron_labs_diffusion"
ARCHITECTURE = "NemotronLabsDiffusionModel"


class ConfigError(ValueError):
    """A config.json that trimode cannot run, with the reason."""


@dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters (``rope_parameters`` in config.json). ``rope_type`` is ``default`` or ``yarn``."""

    rope_type: str = "default"
    rope_theta: float = 1e6
    factor: float = 1.0
    original_max_position_embeddings: int = 16384
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    llama_4_scaling_beta: float = 0.0

    ROPE_TYPES = ("default", "yarn")

    def __post_init__(self) -> None:
        if self.rope_type not in self.ROPE_TYPES:
            raise ConfigError(f"rope_parameters.rope_type={self.rope_type!r} is not supported; allowed: {self.ROPE_TYPES}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_parameters.rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_type == "yarn" and not self.factor >= 1.0:
            raise ConfigError(f"rope_parameters.factor must be >= 1 for yarn, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError("rope_parameters.original_max_position_embeddings must be > 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RopeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        # `type` is the older spelling of `rope_type`; other unknown keys (e.g. `partial_rotary_factor` = 1)
        # are accepted only if they do not change the computation.
        d = {k: v for k, v in d.items() if v is not None}  # null: not set (the key's default)
        if "type" in d and "rope_type" not in d:
            d["rope_type"] = d.pop("type")
        d.pop("type", None)
        prf = d.pop("partial_rotary_factor", 1.0)
        if prf != 1.0:
            raise ConfigError(f"rope_parameters.partial_rotary_factor={prf} is not supported (only 1.0)")
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown rope_parameters keys {unknown}; allowed: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and special tokens of a tri-mode (NLD) checkpoint."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mask_token_id: int
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    block_size: int = 32
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 262144
    rope: RopeConfig = field(default_factory=RopeConfig)
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not _is_int(self.max_position_embeddings) or self.max_position_embeddings <= 0:
            raise ConfigError(f"max_position_embeddings must be a positive integer, "
                              f"got {self.max_position_embeddings!r}")
        if isinstance(self.rms_norm_eps, bool) or not isinstance(self.rms_norm_eps, (int, float)) \
                or not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        for name, ids in (("mask_token_id", (self.mask_token_id,)), ("eos_token_id", self.eos_token_ids),
                          ("bos_token_id", () if self.bos_token_id is None else (self.bos_token_id,))):
            for token_id in ids:
                if not _is_int(token_id) or not 0 <= token_id < self.vocab_size:
                    raise ConfigError(f"{name}={token_id!r} is outside the vocabulary (size {self.vocab_size})")
        if self.torch_dtype not in DTYPE_NAMES:
            raise ConfigError(f"torch_dtype={self.torch_dtype!r} is not supported; allowed: {DTYPE_NAMES}")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every end-of-sequence id (``eos_token_id`` may be one id or a list), in order; () if none."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, (list, tuple)):
            return tuple(self.eos_token_id)
        return (self.eos_token_id,)

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    # ---- config.json round trip ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """The config of a ``config.json`` dict. Absent or ``null`` optional keys are derived as Hugging Face's
        Mistral config derives them (module docstring); raises ``ConfigError`` naming an unsupported or
        missing key."""
        null_required = sorted(k for k in _REQUIRED_KEYS if k in d and d[k] is None)
        if null_required:
            raise ConfigError(f"config.json sets required keys {null_required} to null; they need values")
        d = {k: v for k, v in d.items() if v is not None or k in _NULL_IS_A_VALUE}
        model_type = d.pop("model_type", None)
        if model_type != MODEL_TYPE:
            raise ConfigError(f"unsupported model_type {model_type!r}: trimode runs {MODEL_TYPE!r} checkpoints")
        archs = d.pop("architectures", None) or [ARCHITECTURE]
        if ARCHITECTURE not in archs:
            raise ConfigError(f"unsupported architectures {archs!r}; expected {ARCHITECTURE!r}")
        for key, allowed in _FIXED_KEYS.items():
            if key in d and d[key] not in allowed:
                raise ConfigError(f"{key}={d[key]!r} is not supported; allowed: {list(allowed)}")
        if d.pop("tie_word_embeddings", False):
            raise ConfigError("tie_word_embeddings=true is not supported: NLD checkpoints have an untied diffusion_head")
        rope = d.pop("rope_parameters", None)
        if rope is None:  # older configs spell RoPE as top-level keys
            rope = {"rope_type": "default"} if d.get("rope_scaling") is None else dict(d["rope_scaling"])
            rope.setdefault("rope_theta", d.get("rope_theta", 1e6))
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters must be an object, got {rope!r}")
        d.pop("rope_scaling", None)
        d.pop("rope_theta", None)
        dtype = d.pop("dtype", None) or d.pop("torch_dtype", None) or "bfloat16"
        d.pop("torch_dtype", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"rope", "extra", "torch_dtype"}
        missing = sorted(set(_REQUIRED_KEYS) - set(d))
        if missing:
            raise ConfigError(f"config.json lacks required keys {missing}")
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
        if isinstance(kwargs["hidden_size"], int) and isinstance(kwargs["num_attention_heads"], int) \
                and kwargs["num_attention_heads"] > 0:
            kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        return cls(rope=RopeConfig.from_dict(rope), torch_dtype=dtype, extra=d, **kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: a checkpoint directory needs a config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "auto_map": {
                "AutoConfig": "configuration_nemotron_labs_diffusion.NemotronLabsDiffusionConfig",
                "AutoModel": "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel",
            },
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "dlm_paradigm": "bidirectional",
            "use_cache": False,
        }
        d.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("rope", "extra", "torch_dtype"):
                continue
            value = getattr(self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else value
        d["rope_parameters"] = self.rope.to_dict()
        d["dtype"] = self.torch_dtype
        return d

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


DTYPE_NAMES = ("float32", "float16", "bfloat16")

_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "mask_token_id")
# Keys whose null is a value of its own rather than "not set".
_NULL_IS_A_VALUE = frozenset({"bos_token_id", "eos_token_id", "pad_token_id", "sliding_window"})

# Keys whose other values would change the computation in ways trimode does not implement.
_FIXED_KEYS: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "sliding_window": (None,),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tiny_config(**overrides: Any) -> ModelConfig:
    """A small random-model config of the NLD architecture (tests, examples)."""
    base: dict[str, Any] = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, mask_token_id=3, bos_token_id=1, eos_token_id=2, block_size=8,
        rope=RopeConfig(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                        llama_4_scaling_beta=0.1),
        torch_dtype="float32",
    )
    base.update(overrides)
    return ModelConfig(**base)

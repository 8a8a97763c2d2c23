"""Quantization recipes by name: ``none``, ``fp8``, ``fp8-kv``, ``w4a16``.

A recipe is one name (no combinable flags): it fixes the ModelOpt config, which layers it leaves alone and what
the engine graphs carry (Q/DQ on weights and activations, and on K/V for ``fp8-kv``).

| recipe   | weights                     | activations     | KV cache | ModelOpt config          |
|----------|-----------------------------|-----------------|----------|--------------------------|
| `none`   | as in the checkpoint        | -               | -        | (no ModelOpt)            |
| `fp8`    | FP8 E4M3, per-tensor scale  | FP8, static     | -        | `FP8_DEFAULT_CFG`        |
| `fp8-kv` | as `fp8`                    | as `fp8`        | FP8      | + `FP8_KV_CFG`           |
| `w4a16`  | INT4 AWQ, groups of 128     | 16-bit          | -        | `INT4_AWQ_CFG`           |

``diffusion_head`` and ``encoder.embed_tokens`` stay unquantized (the embedding is never a ModelOpt quant
module); ``quantize_head=True`` quantizes the head too. INT4 packing needs whole groups: a linear whose
``in_features`` is not a multiple of 128 gets the largest group size in (64, 32, 16) that divides it (tiny
models); one that none divides stays unquantized. Each such choice is returned so the build can print it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from torch import nn


class RecipeError(ValueError):
    """An unknown recipe name, or a recipe that cannot apply to this model."""


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    weights: str | None  # "fp8", "int4" or None
    activations: str | None  # "fp8" or None
    kv_cache: str | None  # "fp8" or None
    group_size: int = 0  # INT4 group size (w4a16)

    @property
    def quantizes(self) -> bool:
        return self.weights is not None


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("none", "no quantization: the checkpoint's weights as they are", None, None, None),
    Recipe("fp8", "ModelOpt FP8 (E4M3) weights and activations, per-tensor static scales", "fp8", "fp8", None),
    Recipe("fp8-kv", "fp8 plus an FP8 KV cache (per-layer K and V scales)", "fp8", "fp8", "fp8"),
    Recipe("w4a16", "ModelOpt INT4 AWQ weights (groups of 128), 16-bit activations", "int4", None, None, 128),
)}

INT4_FALLBACK_GROUPS = (64, 32, 16)


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise RecipeError(f"unknown quantization recipe {name!r}; choose one of: {', '.join(RECIPES)}") from None


def int4_group_size(in_features: int, preferred: int = 128) -> int | None:
    """The INT4 group size of a linear with ``in_features`` inputs (None: it cannot be packed in whole groups)."""
    for g in (preferred, *INT4_FALLBACK_GROUPS):
        if in_features % g == 0:
            return g
    return None


def modelopt_config(recipe: Recipe, model: nn.Module, quantize_head: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The ModelOpt ``mtq.quantize`` config of ``recipe`` for ``model``, and notes on per-layer choices.

    ModelOpt applies ``quant_cfg`` entries in order (later ones win): the base config, then per-layer INT4
    group sizes, then the exclusions.
    """
    import modelopt.torch.quantization as mtq

    if not recipe.quantizes:
        raise RecipeError(f"recipe {recipe.name!r} does not quantize")
    base = mtq.FP8_DEFAULT_CFG if recipe.weights == "fp8" else mtq.INT4_AWQ_CFG
    cfg = copy.deepcopy(base)
    entries: list[dict[str, Any]] = cfg["quant_cfg"]
    notes: list[str] = []
    if recipe.kv_cache == "fp8":
        entries.extend(copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"]))
    if recipe.weights == "int4":
        fallbacks: dict[tuple[int, int | None], list[str]] = {}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or (name == "diffusion_head" and not quantize_head):
                continue
            group = int4_group_size(module.in_features, recipe.group_size)
            if group == recipe.group_size:
                continue
            fallbacks.setdefault((module.in_features, group), []).append(name)
            if group is None:
                entries.append({"quantizer_name": f"{name}.*", "enable": False})
            else:
                entries.append({"quantizer_name": f"{name}.weight_quantizer",
                                "cfg": {"num_bits": 4, "block_sizes": {-1: group, "type": "static"}}})
        for (in_features, group), names in fallbacks.items():
            kinds = sorted({re.sub(r"^encoder\.layers\.\d+\.", "", n) for n in names})
            what = "left unquantized" if group is None else f"INT4 groups of {group}"
            notes.append(f"{len(names)} linears have in_features {in_features}, not a multiple of "
                         f"{recipe.group_size}: {what} ({', '.join(kinds)})")
    if not quantize_head:
        entries.append({"quantizer_name": "*diffusion_head*", "enable": False})
    entries.append({"quantizer_name": "*embed_tokens*", "enable": False})
    return cfg, notes

"""GPU targets of the engine build by name (``--target``): ``hopper``, ``blackwell``, ``spark``, ``rtx``.

The one table of what a target is: the TensorRT flavour that builds its engines, the compute capabilities the
engines are built for (engines run only there), the memory per GPU the build's memory budget assumes, and the
rules the build enforces.

| target      | device          | TensorRT     | compute capabilities     | memory per GPU  | reserve | recipes | --tp |
|-------------|-----------------|--------------|--------------------------|-----------------|---------|---------|------|
| `hopper`    | H100            | TensorRT 11  | SM90                     | 80 GiB          | 2 GiB   | any     | any  |
| `blackwell` | B200            | TensorRT 11  | SM100                    | 180 GiB         | 2 GiB   | any     | any  |
| `spark`     | DGX Spark GB10  | TensorRT-RTX | SM121                    | 128 GiB unified | 16 GiB  | any     | 1    |
| `rtx`       | RTX GPUs, Spark | TensorRT-RTX | SM86, SM89, SM120, SM121 | 24 GiB          | 2 GiB   | no FP8  | 1    |

The default recipe is `w4a16` for `spark` and `none` elsewhere.

TensorRT-RTX builds without a GPU (ahead of time; specialised on the GPU at load time); TensorRT 11 builds on
the GPU it targets. ``rtx`` is one portable plan for every listed GPU, so a recipe one of them cannot run is
refused by the builder: FP8 (``fp8``, ``fp8-kv``) needs SM89 or newer and SM86 is in the list. ``--gpu-gb``
overrides the memory for the budget only; ``memory_gb`` is the default (24 GiB: an RTX 3090 / 4090).
"""

from __future__ import annotations

from dataclasses import dataclass


class TargetError(ValueError):
    """An unknown target name, or a build option the target cannot take (recipe, tensor-parallel size)."""


@dataclass(frozen=True)
class Target:
    """One GPU target.

    ``name``: the ``--target`` value. ``device``: the hardware it stands for, as printed in the memory budget.
    ``arch``: the CUDA architecture (``sm_<major><minor>``) TensorRT builds for; ``_compile`` warns when the
    build GPU's differs. ``memory_gb``: memory per GPU in GiB (2^30 bytes), the budget's default ``--gpu-gb``.
    ``reserve_gb``: GiB per GPU the budget keeps out of the KV pool (CUDA context, NCCL buffers, allocator
    slack; on unified memory also the OS and the CPU side). ``unified_memory``: CPU and GPU share
    ``memory_gb`` (one memory, not a discrete GPU's). ``default_recipe``: the quantization recipe when
    ``--quant`` is not given. ``recipes``: the recipes it builds, or None for any. ``max_tp``: the most
    tensor-parallel ranks (GPUs) it has, or None for no limit. ``flavour``: the TensorRT that builds and runs
    its engines ("tensorrt" = TensorRT 11, "tensorrt-rtx"; ``plugins/tensorrt_libs.py``).
    ``compute_capabilities``: what its plans are built for, as ``SM<major><minor>`` (TensorRT-RTX's
    ``ComputeCapability`` names; for TensorRT 11 the build GPU's architecture, which must be this one).
    """

    name: str
    device: str
    arch: str
    memory_gb: float
    reserve_gb: float = 2.0
    unified_memory: bool = False
    default_recipe: str = "none"
    recipes: tuple[str, ...] | None = None
    max_tp: int | None = None
    flavour: str = "tensorrt"
    compute_capabilities: tuple[str, ...] = ()

    def check(self, recipe: str | None, tp: int) -> None:
        """Raise TargetError (one line) if this target cannot build ``recipe`` (None: the default) at ``tp``."""
        if self.recipes is not None and recipe is not None and recipe not in self.recipes:
            memory = f"{self.memory_gb:g} GB {'unified memory' if self.unified_memory else 'per GPU'}"
            raise TargetError(f"--target {self.name} builds {' / '.join(self.recipes)} engines ({memory}); "
                              f"got --quant {recipe}")
        if self.max_tp is not None and tp > self.max_tp:
            gpus = "one GPU" if self.max_tp == 1 else f"{self.max_tp} GPUs"
            raise TargetError(f"--target {self.name} is {gpus}; --tp {tp} needs as many GPUs")


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("hopper", "H100", "sm_90", 80.0, compute_capabilities=("SM90",)),
    Target("blackwell", "B200", "sm_100", 180.0, compute_capabilities=("SM100",)),
    Target("spark", "DGX Spark", "sm_121", 128.0, reserve_gb=16.0, unified_memory=True, default_recipe="w4a16",
           max_tp=1, flavour="tensorrt-rtx", compute_capabilities=("SM121",)),
    Target("rtx", "RTX GPU", "sm_86", 24.0, max_tp=1, flavour="tensorrt-rtx",
           compute_capabilities=("SM86", "SM89", "SM120", "SM121")),
)}


def get_target(name: str) -> Target:
    """The target called ``name``; TargetError naming the choices if there is none."""
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetError(f"unknown --target {name!r}; choose from: {', '.join(TARGETS)}") from None

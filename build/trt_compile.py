"""The TensorRT stage: ONNX graphs -> serialized engines. Runs only where ``tensorrt`` imports and a GPU exists.

Written against the TensorRT 11 Python API (strongly typed networks: precision comes from the graphs' types
and ModelOpt's Q/DQ nodes, no precision flags) and ``tensorrt.plugin`` (the ``trimode`` plugins register
themselves with their AOT Triton kernels: ``trimode.plugins.register_tensorrt_plugins``). It could not be run
on the project's machines (no TensorRT, no GPU); ``tensorrt_status`` says why, and the build stops after the
ONNX stage with the command that finishes it on a GPU host (``--from-onnx DIR``).

Weights resident once: TensorRT shares weights between the execution contexts of **one** engine, never between
engines (a refit copies weights into each engine). So the default layout, ``shared``, builds **one engine**
from ``unified.plugin.onnx`` (all kinds in one network: ``is_causal`` selects the attention pattern through an
``If``, ``kv_append`` skips slot -1, the LoRA is gated) with **one optimization profile per engine kind**
(prefill / decode / draft / verify token ranges); the runtime creates one execution context per kind, each on
its profile. The fallback layout, ``per-kind``, builds one engine per kind graph (weights once per engine);
use it if a TensorRT version rejects plugin nodes inside ``If``. A timing cache (``trt/timing.cache``) is
read and written so rebuilds and the other kinds reuse tactic timings.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from trimode import plugins
from trimode.runtime.executors.engine_kinds import token_range

LAYOUTS = ("shared", "per-kind")


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): TensorRT importable and a CUDA GPU present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, ("the `tensorrt` Python package is not installed (PyPI only has placeholders; install "
                       "TensorRT 11 from NVIDIA)")
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible"
    except ImportError:
        return False, "torch is not installed"
    return True, "ok"


def profile_shapes(kind: str, manifest_shapes: dict[str, int], num_layers: int) -> dict[str, tuple]:
    """(min, opt, max) shapes of every dynamic input for the optimization profile of ``kind``."""
    b, s, blk, page = (manifest_shapes[k] for k in ("max_batch", "max_seq", "block_length", "page_size"))
    t_min, t_opt, t_max = token_range(kind, b, s, blk)
    n_opt = max(1, b // 2)
    pages_per_seq = -(-s // page)
    total_pages = manifest_shapes["max_pages_total"]
    tok = lambda: ((t_min,), (t_opt,), (t_max,))  # noqa: E731
    shapes: dict[str, tuple] = {
        "input_ids": tok(), "positions": tok(), "lora_mask": tok(), "slot_mapping": tok(),
        "block_tables": ((1, 1), (n_opt, pages_per_seq), (b, pages_per_seq)),
        "context_lens": ((1,), (n_opt,), (b,)),
        "query_start": ((2,), (n_opt + 1,), (b + 1,)),
        "logits_index": ((1,), (t_opt,), (t_max,)),
    }
    heads = manifest_shapes.get("num_kv_heads_per_rank", manifest_shapes["num_kv_heads"])  # --tp: this rank's
    pool = lambda n: (n, page, heads, manifest_shapes["head_dim"])  # noqa: E731
    for layer in range(num_layers):
        for which in "kv":
            shapes[f"{which}_pool.{layer}"] = (pool(1), pool(total_pages), pool(total_pages))
    return shapes


def _check_collectives(trt, network, num_ranks: int, path: Path, expected: int) -> None:
    """A --tp graph's all-reduces must have become multi-device DistCollective layers of ``num_ranks``."""
    kind = getattr(trt.LayerType, "DIST_COLLECTIVE", None)
    if kind is None:
        raise RuntimeError(f"TensorRT {trt.__version__} has no DistCollective layer; --tp engines need TensorRT 11")
    found = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == kind:
            layer.__class__ = trt.IDistCollectiveLayer  # the Python API hands out ILayer; this is its real type
            if layer.num_ranks != num_ranks:
                layer.num_ranks = num_ranks
            found += 1
    if found != expected:
        raise RuntimeError(f"{path.name}: {found} DistCollective layers after parsing, expected {expected} "
                           f"(one per row-parallel layer and the embedding)")


def build_engines(onnx_dir: Path, out_dir: Path, kinds: list[str], shapes: dict[str, int], num_layers: int,
                  layout: str = "shared", workspace_gb: float = 8.0, plan_prefix: str = "trt/",
                  num_ranks: int = 1) -> dict[str, Any]:
    """Compile the graphs of ``onnx_dir`` into ``out_dir`` (``engine.plan`` or ``<kind>.plan``, ``timing.cache``);
    returns the manifest's ``tensorrt`` section (files, profiles per kind, versions). ``num_ranks`` > 1: one
    rank's graph set of a ``--tp`` build, whose all-reduce nodes become NCCL ``DistCollective`` layers."""
    import tensorrt as trt

    if layout not in LAYOUTS:
        raise ValueError(f"unknown TensorRT layout {layout!r}; choose from {LAYOUTS}")
    plugins.register_tensorrt_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = out_dir / "timing.cache"
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))

    def network_from(path: Path):
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # the only mode in TensorRT 11
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT's ONNX parser rejected {path.name}: {errors}")
        if num_ranks > 1:
            _check_collectives(trt, network, num_ranks, path, expected=2 * num_layers + 1)
        return network

    def add_profile(network, kind: str) -> int:
        profile = builder.create_optimization_profile()
        wanted = profile_shapes(kind, shapes, num_layers)
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            if name in wanted:
                profile.set_shape(name, *wanted[name])
        return config.add_optimization_profile(profile)

    result: dict[str, Any] = {"layout": layout, "version": trt.__version__, "engines": {}}
    jobs = [("engine.plan", "unified.plugin.onnx", kinds)] if layout == "shared" else \
        [(f"{k}.plan", f"{k}.plugin.onnx", [k]) for k in kinds]
    for plan_name, graph, plan_kinds in jobs:
        print(f"tensorrt: building {plan_name} from {graph} (profiles: {', '.join(plan_kinds)})", file=sys.stderr,
              flush=True)
        network = network_from(onnx_dir / graph)
        profiles = {k: add_profile(network, k) for k in plan_kinds}
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build {plan_name} (see the log above)")
        (out_dir / plan_name).write_bytes(bytes(serialized))
        for kind, index in profiles.items():
            result["engines"][kind] = {"plan": f"{plan_prefix}{plan_name}", "profile": index}
        config = builder.create_builder_config()  # a fresh config (profiles) for the next plan, same cache
        config.set_timing_cache(cache, ignore_mismatch=False)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    cache_path.write_bytes(bytes(cache.serialize()))
    return result

"""The TensorRT executor: an engine directory's TensorRT plans on a GPU, one execution context per engine kind,
for both TensorRT flavours (``plugins/tensorrt_libs.py``).

- **TensorRT-RTX** plans (``--target spark`` / ``rtx``) load with ``tensorrt_rtx``: the plan was built ahead of
  time for a list of compute capabilities and is specialised just in time on the GPU found here. Each context is
  created with an ``IRuntimeConfig`` whose runtime cache (the JIT's kernels) is read from and written back to
  ``trt/<plan>.runtime-cache`` beside the plan, so the second start skips the specialisation.
- **TensorRT 11** plans (``--target hopper`` / ``blackwell``) load with ``tensorrt``.

Before anything is deserialized the manifest is checked against the TensorRT that is to run it
(``engine_dir.check_tensorrt``: flavour, version, the GPU's compute capability among the plan's targets) and a
TensorRT-RTX plan's header against the manifest (``EngineSet``); a mismatch is refused naming both sides.
The ``trimode`` plugins (``plugins/trt_plugins.py``) are registered in this process: TensorRT-RTX has no
embedded Python plugins, so the process that runs an engine needs the same creators as the one that built it.

Layout ``shared`` (the default): one plan with one optimization profile per kind; each kind's context runs on
its profile, so the weights are resident once. Layout ``per-kind``: one plan per kind. Every context binds the
runtime's one KV pool by address (``binding_plan``): layer l's ``k_pool.{l}`` input and its aliased
``k_pool_out.{l}`` output are the same slice of the pool, written in place by the ``kv_append`` plugin.

What could not run on the project's machines: deserializing and executing a plan needs a CUDA GPU (an RTX-class
GPU or a DGX Spark for TensorRT-RTX, where ``Runtime.deserialize_cuda_engine`` returns None without a driver;
TensorRT 11 is not installable from PyPI). Everything up to the execution call (plan selection, header checks,
input feeds, shapes against each kind's profile, pool addresses, the runtime-cache path) is tested on CPU with
the real TensorRT-RTX module; ``scripts/verify_engine.py`` compares this executor with the torch executor on a
GPU host.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from trimode.plugins import tensorrt_libs, trt_plugins
from trimode.runtime.executors.base import Executor, register_executor
from trimode.runtime.executors.engine_dir import (EngineDirError, EngineMismatch, check_engine_dir, check_tensorrt,
                                                  tensor_parallel_size)
from trimode.runtime.executors.engine_kinds import token_range
from trimode.runtime.executors.decisions import DECISION_OUTPUTS
from trimode.runtime.executors.onnx_executor import graph_feeds, run_by_engine_kind
from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.passes import PassOutput, SeqPass, split_outputs

RUNTIME_CACHE_SUFFIX = ".runtime-cache"


class EngineSet:
    """The plans of an engine directory and which kind runs on which (GPU-free; used by the executor).

    ``kinds``: {kind: (plan path relative to the directory, optimization profile index)}; ``plans``: {plan
    path: bytes}; ``flavour`` / ``version`` / ``compute_capabilities`` from the manifest's ``tensorrt`` section.
    A TensorRT-RTX plan's header must name the manifest's version and targets (EngineMismatch otherwise).
    """

    def __init__(self, engine_dir: str | Path, manifest: dict[str, Any]) -> None:
        self.engine_dir = Path(engine_dir)
        section = manifest.get("tensorrt")
        if not section:
            raise EngineDirError(f"engine directory {self.engine_dir} has no TensorRT engines (stage "
                                 f"{manifest.get('stage')!r}): build it with scripts/build_engine.py --target "
                                 f"spark|rtx (TensorRT-RTX, any machine) or finish it on a GPU host with "
                                 f"--from-onnx {self.engine_dir} (TensorRT 11)")
        self.flavour = section.get("flavour", "tensorrt")
        self.version = section.get("version")
        self.compute_capabilities = list(section.get("compute_capabilities") or [])
        self.kinds = {kind: (spec["plan"], int(spec["profile"])) for kind, spec in section["engines"].items()}
        self.plans = {plan: (self.engine_dir / plan).read_bytes() for plan, _ in self.kinds.values()}
        if self.flavour == "tensorrt-rtx":
            for plan, data in self.plans.items():
                header = tensorrt_libs.rtx_plan_header(data)
                if self.version and not tensorrt_libs.same_release(header["version"], str(self.version)):
                    raise EngineMismatch(f"{plan} header version", header["version"], self.version, self.engine_dir)
                if self.compute_capabilities and header["targets"] != self.compute_capabilities:
                    raise EngineMismatch(f"{plan} header targets", header["targets"], self.compute_capabilities,
                                         self.engine_dir)

    def runtime_cache_path(self, plan: str) -> Path:
        """Where the TensorRT-RTX runtime cache of ``plan`` is kept: beside it, ``<plan>.runtime-cache``."""
        path = self.engine_dir / plan
        return path.with_name(path.name + RUNTIME_CACHE_SUFFIX)


def check_profile(kind: str, feeds: dict[str, np.ndarray], shapes: dict[str, int]) -> None:
    """Raise ValueError unless the feeds of one ``kind`` forward fit its optimization profile (built from the
    manifest's ``shapes``: batch, sequence length, block; ``engine_kinds.token_range``): tokens <= the kind's
    maximum, sequences <= max_batch, block-table width <= pages per sequence."""
    num_tokens, num_seqs = len(feeds["input_ids"]), len(feeds["context_lens"])
    t_min, _, t_max = token_range(kind, shapes["max_batch"], shapes["max_seq"], shapes["block_length"])
    pages = -(-shapes["max_seq"] // shapes["page_size"])
    if not t_min <= num_tokens <= t_max:
        raise ValueError(f"{kind} engine: {num_tokens} tokens in one forward, its profile takes {t_min}..{t_max}")
    if num_seqs > shapes["max_batch"]:
        raise ValueError(f"{kind} engine: {num_seqs} sequences in one forward, built for at most {shapes['max_batch']}")
    if feeds["block_tables"].shape[1] > pages:
        raise ValueError(f"{kind} engine: block tables of {feeds['block_tables'].shape[1]} pages, built for at most "
                         f"{pages} per sequence")
    drafts = feeds.get("draft_tokens")
    if drafts is not None and drafts.shape[0] and drafts.shape[1] > shapes["block_length"]:
        raise ValueError(f"{kind} engine: a deciding pass with {drafts.shape[1]} drafts, its profile takes at most "
                         f"{shapes['block_length']} (the built block_length; longer verify passes take logits)")


def check_pool(cache: PagedKVCache, shapes: dict[str, int]) -> None:
    """Raise ValueError unless the runtime's pool fits the plans' KV-pool profile: at most ``max_pages_total``
    pages (the build's ``--max-batch`` x pages of ``--max-seq``) of the built page size."""
    limit = shapes.get("max_pages_total")
    if cache.page_size != shapes["page_size"]:
        raise ValueError(f"the KV pool has pages of {cache.page_size} tokens, the engines were built for "
                         f"{shapes['page_size']}")
    if limit is not None and cache.num_pages > limit:
        raise ValueError(f"the KV pool has {cache.num_pages} pages, the engines' profiles take at most {limit} "
                         f"(--max-batch x --max-seq of the build); run with --num-pages {limit} or rebuild")


def binding_plan(passes: Sequence[SeqPass], cache: PagedKVCache, inputs: set[str], outputs: set[str]
                 ) -> tuple[dict[str, np.ndarray], list[tuple[str, tuple[int, ...], int]]]:
    """(feeds, pool bindings) of one forward of ``passes`` (all of one engine kind) on an engine whose input /
    output tensor names are ``inputs`` / ``outputs``. Feeds: the graph inputs other than the pools, as numpy
    arrays (``is_causal`` and an all -1 ``slot_mapping`` for a pass that keeps nothing when the engine is the
    unified one). Pool bindings: (tensor name, shape, device address) of every layer's ``k_pool.{l}`` /
    ``v_pool.{l}`` input and, if the engine has them, the aliased ``k_pool_out.{l}`` / ``v_pool_out.{l}`` outputs
    at the **same** address (the pool is written in place, never copied)."""
    unified = "is_causal" in inputs
    keeps = passes[0].kind.keeps_kv
    feeds = graph_feeds(passes, cache, keeps or unified, "lora_mask" in inputs)
    if unified:
        feeds["is_causal"] = np.array(passes[0].kind.is_causal)
        if not keeps:
            feeds["slot_mapping"] = np.full(len(feeds["input_ids"]), -1, np.int64)  # written nowhere
    feeds = {k: v for k, v in feeds.items() if k in inputs}
    pools = []
    for layer in range(cache.k_pool.shape[0]):
        for which, pool in (("k", cache.k_pool), ("v", cache.v_pool)):
            ptr, shape = pool[layer].data_ptr(), tuple(pool[layer].shape)
            pools.append((f"{which}_pool.{layer}", shape, ptr))
            if f"{which}_pool_out.{layer}" in outputs:
                pools.append((f"{which}_pool_out.{layer}", shape, ptr))
    return feeds, pools


def device_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; an empty tensor (no logit rows when every pass decides, no deciding pass) as a view of
    a one-element buffer, so that ``tensor_address`` has an address to give TensorRT."""
    if t.numel():
        return t.to(device)
    return torch.empty(1, dtype=t.dtype, device=device)[:0].view(t.shape)


def device_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output buffer of ``shape`` on ``device`` (allocated there: nothing is copied); an empty
    one as a view of a one-element buffer (``tensor_address``)."""
    if all(shape):
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty(1, dtype=dtype, device=device)[:0].view(shape)


def tensor_address(t: torch.Tensor) -> int:
    """The address TensorRT gets for ``t``: its data, or for an empty tensor (torch says 0) its buffer's."""
    return t.data_ptr() or t.untyped_storage().data_ptr()


class _Context:
    """One kind's execution context on its profile (with the plan's TensorRT-RTX runtime cache, if any)."""

    def __init__(self, trt, engine, profile: int, stream: torch.cuda.Stream, runtime_cache=None) -> None:
        self.engine = engine
        if runtime_cache is not None:
            config = engine.create_runtime_config()
            config.set_runtime_cache(runtime_cache)
            self.context = engine.create_execution_context(config)
        else:
            self.context = engine.create_execution_context()
        self.context.set_optimization_profile_async(profile, stream.cuda_stream)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self.outputs = set(names) - self.inputs


@register_executor("tensorrt")
class TensorRTExecutor(Executor):
    """Runs an engine directory's TensorRT plans (either flavour) over the runtime's paged KV pool on a CUDA GPU.

    ``engine_dir``: the directory; ``cache``: the runtime's pool (on CUDA; page size as built); ``check``:
    verify file hashes (else sizes only). Raises ``EngineDirError`` / ``EngineMismatch`` for an engine
    directory built for another TensorRT flavour, version or GPU, ``tensorrt_libs.TensorRTUnavailable`` when the
    plan's TensorRT is not installed, ``tensorrt_libs.LoaderPathError`` when a TensorRT-RTX process was not
    started with ``libtensorrt_rtx.so`` on its loader path (``tensorrt_libs.reexec_with_loader_path`` fixes
    that at an entry point), ValueError without a CUDA pool. Not executed on the project's CPU machines (see the
    module docstring).
    """

    def __init__(self, engine_dir: str | Path, cache: PagedKVCache, model=None, check: bool = True) -> None:
        self.engine_dir = Path(engine_dir)
        manifest = check_engine_dir(self.engine_dir, page_size=cache.page_size) if check else \
            check_engine_dir(self.engine_dir, verify_hashes=False)
        if tensor_parallel_size(manifest) > 1:
            raise ValueError(f"engine directory {self.engine_dir} holds {tensor_parallel_size(manifest)} ranks' "
                             f"engines; the TensorRT executor runs single-rank engines only (a --tp engine's "
                             f"DistCollective layers need an NCCL communicator per context, "
                             f"IExecutionContext.set_communicator, "
                             f"which this runtime does not create yet): run it with the onnxruntime executor, or "
                             f"build with --tp 1")
        self.plans = EngineSet(self.engine_dir, manifest)
        trt = tensorrt_libs.import_tensorrt(self.plans.flavour)
        if cache.k_pool.device.type != "cuda":
            raise ValueError("the TensorRT executor needs the KV pool on a CUDA device")
        gpu = tensorrt_libs.compute_capability_name(*torch.cuda.get_device_capability(cache.k_pool.device))
        check_tensorrt(manifest, self.engine_dir, flavour=self.plans.flavour, version=str(trt.__version__),
                       compute_capability=gpu)
        if self.plans.flavour == "tensorrt-rtx":
            tensorrt_libs.require_loader_path(f"loading the TensorRT-RTX engines of {self.engine_dir}")
        trt_plugins.register(trt)
        check_pool(cache, manifest["shapes"])
        self.cache, self.trt, self.shapes = cache, trt, manifest["shapes"]
        self.stream = torch.cuda.Stream(cache.k_pool.device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines: dict[str, object] = {}
        self.runtime_caches: dict[str, object] = {}
        self.contexts: dict[str, _Context] = {}
        for kind, (plan, profile) in self.plans.kinds.items():
            if plan not in self.engines:
                engine = runtime.deserialize_cuda_engine(self.plans.plans[plan])
                if engine is None:
                    raise RuntimeError(f"{self.plans.flavour} {trt.__version__} could not deserialize {plan} of "
                                       f"{self.engine_dir} on this {gpu} GPU (see the TensorRT log above)")
                self.engines[plan] = engine
                if self.plans.flavour == "tensorrt-rtx":
                    self.runtime_caches[plan] = self._load_runtime_cache(engine, plan)
            self.contexts[kind] = _Context(trt, self.engines[plan], profile, self.stream,
                                           self.runtime_caches.get(plan))
        self.decides = all("decide_index" in c.inputs for c in self.contexts.values())

    def _load_runtime_cache(self, engine, plan: str):
        cache = engine.create_runtime_config().create_runtime_cache()
        path = self.plans.runtime_cache_path(plan)
        if path.is_file():
            cache.deserialize(path.read_bytes())
        return cache

    def close(self) -> None:
        """Write each TensorRT-RTX plan's runtime cache beside it (atomically), then drop the contexts."""
        for plan, cache in getattr(self, "runtime_caches", {}).items():
            path = self.plans.runtime_cache_path(plan)
            try:
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                tmp.write_bytes(bytes(cache.serialize()))
                os.replace(tmp, path)
            except OSError:  # a read-only engine directory: the next start specialises again
                pass
        self.runtime_caches = {}
        self.contexts = {}

    def _run(self, kind: str, passes: list[SeqPass]) -> list[PassOutput]:
        ctx, cache = self.contexts[kind], self.cache
        feeds, pools = binding_plan(passes, cache, ctx.inputs, ctx.outputs)
        check_profile(kind, feeds, self.shapes)
        device = cache.k_pool.device
        tensors = {k: device_tensor(torch.from_numpy(np.ascontiguousarray(v)), device) for k, v in feeds.items()}
        c = ctx.context
        shapes = [(name, tuple(t.shape)) for name, t in tensors.items()]
        shapes += [(name, shape) for name, shape, _ in pools if name in ctx.inputs]
        for name, shape in shapes:
            if not c.set_input_shape(name, shape):
                raise ValueError(f"{kind} engine: input {name} of shape {list(shape)} is outside its optimization "
                                 f"profile")
        for name, t in tensors.items():
            c.set_tensor_address(name, tensor_address(t))
        for name, _, ptr in pools:
            c.set_tensor_address(name, ptr)
        results = {}  # logits (the rows of passes that do not decide) and the decisions, on the device
        for name in ("logits", *(o for o in DECISION_OUTPUTS if o in ctx.outputs)):
            dtype = torch.float32 if name in ("logits", "unmask_confidence") else torch.int32
            results[name] = device_empty(tuple(c.get_tensor_shape(name)), dtype, device)
            c.set_tensor_address(name, tensor_address(results[name]))
        with torch.cuda.stream(self.stream):
            if not c.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution of the {kind} engine failed")
        self.stream.synchronize()
        host = {k: v.cpu() for k, v in results.items() if k != "logits"}  # a few int32 / fp32 per pass
        return split_outputs(passes, results["logits"], host.get("accepted"), host.get("bonus"),
                             host.get("unmask_tokens"), host.get("unmask_confidence"))

    @torch.no_grad()
    def forward(self, passes: Sequence[SeqPass]) -> list[PassOutput]:
        if not self.decides and any(p.decide for p in passes):
            raise ValueError(f"the plans of {self.engine_dir} do not decide (built before GRAPH_VERSION 3): passes "
                             f"must not ask for decisions")

        def run(kind: str, batch: list[SeqPass]) -> list[PassOutput]:
            if kind not in self.contexts:
                raise ValueError(f"engine directory {self.engine_dir} has no {kind!r} engine")
            return self._run(kind, batch)

        return self.count(run_by_engine_kind(passes, run))


def tensorrt_runnable(engine_dir: str | Path, need_loader_path: bool = True) -> tuple[bool, str]:
    """(True, "ok") if this process could run ``engine_dir``'s TensorRT plans: they exist, their TensorRT
    flavour imports at the version they were built with, a CUDA GPU among their compute capabilities is
    visible, and (TensorRT-RTX, ``need_loader_path``) the loader finds ``libtensorrt_rtx.so``; else (False, why).
    For callers choosing an executor; an entry point that can re-execute itself with the loader path
    (``tensorrt_libs.reexec_with_loader_path``) asks with ``need_loader_path=False`` first."""
    try:
        manifest = check_engine_dir(engine_dir, verify_hashes=False)
        section = manifest.get("tensorrt")
        if not section:
            return False, f"{engine_dir} has no TensorRT engines"
        flavour = section.get("flavour", "tensorrt")
        available, why = tensorrt_libs.flavour_available(flavour)  # decided without importing it
        if not available:
            return False, why
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible"
        gpu = tensorrt_libs.compute_capability_name(*torch.cuda.get_device_capability())
        check_tensorrt(manifest, engine_dir, flavour=flavour, version=tensorrt_libs.flavour_version(flavour),
                       compute_capability=gpu)
        if need_loader_path and flavour == "tensorrt-rtx" and not tensorrt_libs.loader_ready():
            return False, (f"libtensorrt_rtx.so is not on this process's loader path (start it with "
                           f"LD_LIBRARY_PATH={tensorrt_libs.link_dir()}, as `trimode generate` does itself)")
    except EngineDirError as e:
        return False, str(e)
    return True, "ok"

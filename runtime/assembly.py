"""Assembling a runtime: the one place where a model, a tokenizer, the page pool, an executor and the decoding
loop are put together, from a checkpoint, an engine directory, or this rank's part of either under tensor
parallelism. ``TriModeLM`` (runtime.api) wraps what these functions return and never assembles anything itself;
this module never imports the API.

A ``Runtime`` is one process's (or tensor-parallel rank 0's) runtime; the other ranks get a
``TensorParallelWorker`` (runtime.parallel.step), which serves rank 0's steps until it closes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from trimode.runtime.engine import Engine
from trimode.runtime.executors.base import Executor, make_executor
from trimode.runtime.executors.engine_dir import (EngineDirError, EngineLimits, EngineMismatch, check_engine_dir,
                                                  engine_checkpoint, engine_limits, tensor_parallel_size)
from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.model.checkpoint import load_config, load_model, load_tokenizer
from trimode.runtime.model.network import NLDModel, on_meta_device
from trimode.runtime.model.tokenizer import Tokenizer
from trimode.runtime.parallel.comm import TPComm
from trimode.runtime.parallel.sharding import load_sharded_model
from trimode.runtime.parallel.step import MirrorCache, TensorParallelExecutor, TensorParallelWorker, handshake
from trimode.runtime.scheduling import load_costs
from trimode.runtime.settings import DEFAULTS, ENGINE_EXECUTORS, RuntimeSettings

ExecutorFactory = Callable[[NLDModel, PagedKVCache], Executor]  # called as factory(model, cache)
_log = logging.getLogger("trimode")


@dataclass
class Runtime:
    """One runtime: ``model`` (its weights, or a placeholder giving config, dtype and KV heads when an engine
    executor computes), ``tokenizer`` (None: token ids only), the one ``cache``, the ``executor`` over it, the
    decoding loop ``engine``, the ``settings`` it was sized by (executor and page size as actually used), and the
    checked manifest of the engine directory it runs (None for a checkpoint)."""

    model: NLDModel
    tokenizer: Tokenizer | None
    cache: PagedKVCache
    executor: Executor
    engine: Engine
    settings: RuntimeSettings
    engine_manifest: dict[str, Any] | None = None


def build_runtime(model: NLDModel, tokenizer: Tokenizer | None = None, settings: RuntimeSettings = DEFAULTS,
                  executor: str | ExecutorFactory | None = None, limits: EngineLimits | None = None,
                  pool_device: torch.device | None = None) -> Runtime:
    """A runtime over ``model``: a page pool of ``settings.num_pages`` x ``settings.page_size`` tokens for the
    KV heads this process holds (all of them, or its share under tensor parallelism), in the model's dtype and
    on its device (or ``pool_device``: an engine executor's GPU while the placeholder model stays on the CPU); the executor named ``executor`` (default ``settings.executor``) or made by the factory
    ``executor(model, cache)``; a decoding loop of ``settings.max_batch_size`` sequences that admits requests
    within ``limits`` (an engine directory's; None: the model's positions and the pool only)."""
    cfg = model.config
    param = next(model.parameters())
    num_kv_heads = model.encoder.layers[0].self_attn.hkv
    cache = PagedKVCache(cfg.num_hidden_layers, num_kv_heads, cfg.head_dim, settings.num_pages,
                         settings.page_size, dtype=param.dtype, device=pool_device or param.device)
    executor = settings.executor if executor is None else executor
    if callable(executor):
        ex = executor(model, cache)
    else:
        kwargs = settings.executor_kwargs if executor == settings.executor else {}
        ex = make_executor(executor, model=model, cache=cache, **kwargs)
        settings = settings.with_(executor=executor)
    engine = Engine(ex, cfg.mask_token_id, cfg.max_position_embeddings, settings.max_batch_size, limits)
    return Runtime(model, tokenizer, cache, ex, engine, settings)


def settings_within(settings: RuntimeSettings, limits: EngineLimits) -> RuntimeSettings:
    """``settings`` sized by an engine directory's build-time limits: the page size it was built for, and
    ``num_pages`` / ``max_batch_size`` not given (``RuntimeSettings.given``) become its ``max_pages_total`` /
    ``max_batch``; values given above them are refused (``EngineMismatch`` naming the manifest field)."""
    changes = {"page_size": limits.page_size}
    for name, limit, where in (("num_pages", limits.max_pages, "shapes.max_pages_total"),
                               ("max_batch_size", limits.max_batch, "shapes.max_batch")):
        value = getattr(settings, name)
        if name not in settings.given:
            changes[name] = limit
        elif value > limit:
            raise EngineMismatch(where, limit, value, Path(limits.source))
    return settings.with_(**changes)


def from_checkpoint(path: str | Path, settings: RuntimeSettings = DEFAULTS, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> Runtime:
    """The runtime of checkpoint ``path`` (plain or ModelOpt-quantized; ``CheckpointError`` names what is wrong).
    ``dtype`` overrides ``settings.dtype``."""
    model = load_model(path, dtype=dtype if dtype is not None else settings.torch_dtype, device=device)
    return with_measured_costs(build_runtime(model, load_tokenizer(path, model.config), settings), path)


def with_measured_costs(rt: Runtime, directory: str | Path) -> Runtime:
    """Give mode ``auto`` the pass costs measured for this runtime's executor and stored beside ``directory``
    (``pass_costs.<executor>.json``: ``trimode profile --save``), when there are some."""
    costs = load_costs(directory, rt.settings.executor)
    if costs is not None:
        measured = costs.meta.get("executor_threads") or costs.meta.get("torch_threads")
        threads = getattr(rt.executor, "threads", None)
        if measured and threads and measured != threads:  # a pool of another size costs passes differently
            _log.warning("trimode: %s was measured with %s threads, this runtime has %s: mode auto uses it as it "
                         "is (measure again with --threads %s)", costs.source, measured, threads, threads)
        rt.engine.scheduler.costs = costs
    return rt


def choose_engine_executor(directory: str | Path, need_loader_path: bool = True) -> tuple[str, str]:
    """(executor, why) that ``executor="auto"`` picks for an engine directory: "tensorrt" when its TensorRT plans
    can run in this process (``trt_executor.tensorrt_runnable``: plans present, their TensorRT flavour and version
    installed, a CUDA GPU among their targets; ``need_loader_path`` False: an entry point that re-executes itself
    with ``libtensorrt_rtx.so`` on its loader path asks), else "onnxruntime" (the reference-form graphs, any CPU);
    ``why`` says so for a log line."""
    from trimode.runtime.executors.trt_executor import tensorrt_runnable

    runnable, reason = tensorrt_runnable(directory, need_loader_path=need_loader_path)
    if runnable:
        return "tensorrt", "the TensorRT plans"
    return "onnxruntime", f"the reference graphs, since the TensorRT plans cannot run here: {reason}"


def engine_executor(directory: str | Path) -> str:
    """The executor ``executor="auto"`` picks for an engine directory (``choose_engine_executor``)."""
    return choose_engine_executor(directory)[0]


def _placeholder_model(checkpoint: Path, tp: int = 1) -> NLDModel:
    """An ``NLDModel`` of the checkpoint's config whose tensors are allocated but never written or read: what a
    runtime needs (config, dtype, device, the KV heads this rank holds) when an engine executor computes
    (untouched pages stay non-resident)."""
    with on_meta_device():
        model = NLDModel(load_config(checkpoint))
    for layer in model.encoder.layers:
        layer.self_attn.hkv //= tp  # the pool holds this rank's share of the KV heads
    return model.to_empty(device="cpu").float().eval()


def from_engine_dir(directory: str | Path, executor: str = "onnxruntime", settings: RuntimeSettings = DEFAULTS,
                    page_size: int | None = None, **executor_kwargs) -> Runtime:
    """The runtime of an engine directory: the manifest is checked first (a mismatch with ``page_size``, when
    given, is refused with ``EngineMismatch``; a damaged directory with ``EngineDirError``), the runtime is sized
    and admits requests by the engines' build-time limits (``settings_within``, ``Engine.check_request``: the
    same whatever the executor, so what runs here would run on the TensorRT engines), then ``executor`` runs
    it: "tensorrt" (the TensorRT plans, either flavour, on a CUDA GPU), "onnxruntime" (the reference-form
    graphs), "torch" (the engine's checkpoint, dequantized if quantized: the baseline the engines are compared
    with) or "auto" (``engine_executor``: tensorrt where it can run, else onnxruntime). A ``--tp`` build is
    refused here (``from_engine_dir_tensor_parallel`` runs it)."""
    directory = Path(directory)
    if executor == "auto":
        executor = engine_executor(directory)
    manifest = check_engine_dir(directory, page_size=page_size)
    if tensor_parallel_size(manifest) != 1:
        raise EngineMismatch("tensor_parallel.size", tensor_parallel_size(manifest), 1, directory)
    limits = engine_limits(manifest, directory)
    settings = settings_within(settings, limits).with_(executor=executor)
    ckpt = engine_checkpoint(directory)
    pool_device = None
    if executor == "torch":
        model, factory = load_model(ckpt), None
    elif executor == "onnxruntime":
        model = _placeholder_model(ckpt)

        def factory(model: NLDModel, cache: PagedKVCache) -> Executor:
            return make_executor("onnxruntime", engine_dir=directory, cache=cache, check=False,
                                 **{**settings.executor_kwargs, **executor_kwargs})
    elif executor == "tensorrt":
        from trimode.runtime.executors.trt_executor import tensorrt_runnable

        runnable, why = tensorrt_runnable(directory)
        if not runnable:
            raise EngineDirError(f"the tensorrt executor cannot run {directory} in this process: {why} "
                                 f"(executor 'onnxruntime' runs its reference graphs on any CPU)")
        model = _placeholder_model(ckpt)  # never on the GPU: the plans hold the weights; only the pool goes there
        pool_device = torch.device("cuda")

        def factory(model: NLDModel, cache: PagedKVCache) -> Executor:  # executor_kwargs are onnxruntime's
            return make_executor("tensorrt", engine_dir=directory, cache=cache, check=False)
    else:
        raise ValueError(f"executor {executor!r} cannot run an engine directory; use "
                         f"{', '.join(map(repr, ENGINE_EXECUTORS))}")
    rt = build_runtime(model, load_tokenizer(ckpt, model.config), settings, factory, limits, pool_device)
    rt.engine_manifest = manifest
    return with_measured_costs(rt, directory)


def rank_runtime(model: NLDModel, comm: TPComm, make_inner: ExecutorFactory, tokenizer_dir: str | Path,
                 settings: RuntimeSettings = DEFAULTS,
                 limits: EngineLimits | None = None) -> Runtime | TensorParallelWorker:
    """This rank's runtime over ``model`` (its shard, or a placeholder whose config and KV heads an engine
    executor uses): rank 0 a ``Runtime`` whose executor broadcasts each step before running
    ``make_inner(model, cache)``, the other ranks a ``TensorParallelWorker`` on a mirrored pool; then every rank
    checks that all agree on the model and the pool (``TensorParallelConfigError`` if not)."""
    cfg = model.config
    if comm.is_leader:
        rt = build_runtime(model, load_tokenizer(tokenizer_dir, cfg), settings,
                           lambda model, cache: TensorParallelExecutor(make_inner(model, cache), comm), limits)
        cache = rt.cache
    else:
        p = next(model.parameters())
        cache = MirrorCache(cfg.num_hidden_layers, model.encoder.layers[0].self_attn.hkv, cfg.head_dim,
                            settings.num_pages, settings.page_size, dtype=p.dtype, device=p.device)
        worker = TensorParallelWorker(model, cache, make_inner(model, cache), comm)
    handshake(comm, cfg, cache)
    return rt if comm.is_leader else worker


def from_checkpoint_tensor_parallel(path: str | Path, comm: TPComm, settings: RuntimeSettings = DEFAULTS,
                                    dtype: str | torch.dtype | None = None) -> Runtime | TensorParallelWorker:
    """This rank's shard of checkpoint ``path`` (read slice by slice). Rank 0 gets a ``Runtime`` (close its
    executor at the end; an idle server calls ``executor.keepalive()`` more often than the collective
    timeout), the other ranks a ``TensorParallelWorker`` (call ``serve()``). Every rank must be started with
    the same settings (checked). ``settings.executor`` names the per-rank executor."""
    model = load_sharded_model(path, comm, dtype if dtype is not None else settings.torch_dtype)
    kwargs = settings.executor_kwargs
    return rank_runtime(model, comm,
                        lambda model, cache: make_executor(settings.executor, model=model, cache=cache, **kwargs),
                        path, settings)


def from_engine_dir_tensor_parallel(directory: str | Path, comm: TPComm, settings: RuntimeSettings = DEFAULTS,
                                    page_size: int | None = None,
                                    **executor_kwargs) -> Runtime | TensorParallelWorker:
    """This rank's part of a ``build_engine.py --tp N`` directory, run by the onnxruntime executor on its graph
    set; rank 0 a ``Runtime``, the other ranks a ``TensorParallelWorker``. A directory built for another
    number of ranks is refused (``EngineMismatch`` naming ``tensor_parallel.size``)."""
    directory = Path(directory)
    manifest = check_engine_dir(directory, page_size=page_size)
    tp = tensor_parallel_size(manifest)
    if tp != comm.world_size:
        raise EngineMismatch("tensor_parallel.size", tp, comm.world_size, directory)
    ckpt = engine_checkpoint(directory)
    limits = engine_limits(manifest, directory)
    settings = settings_within(settings, limits)
    loaded = rank_runtime(_placeholder_model(ckpt, tp), comm,
                          lambda model, cache: make_executor("onnxruntime", engine_dir=directory, cache=cache,
                                                             check=False, comm=comm, **executor_kwargs),
                          ckpt, settings, limits)
    if comm.is_leader:
        loaded.engine_manifest = manifest
    return loaded

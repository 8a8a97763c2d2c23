"""The TensorRT executor: an engine directory's TensorRT engines on a GPU, one execution context per kind.

Layout ``shared`` (the default, build/trt_compile.py): one engine built from the unified graph, one
optimization profile per kind; each kind gets an execution context on its profile, so the weights are
resident once. Layout ``per-kind``: one engine per kind. Either way every context binds the runtime's one KV
pool by address (``set_tensor_address``): layer l's ``k_pool.{l}`` input and its aliased ``k_pool_out.{l}``
output are the same slice of the pool, written in place by the ``kv_append`` plugin; nothing is copied.

Written against the TensorRT 11 Python API (``deserialize_cuda_engine``, ``create_execution_context``,
``set_optimization_profile_async``, ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``). It
could not be run on the project's machines (no TensorRT, no GPU); ``scripts/verify_engine.py`` runs it against
the torch executor on a GPU host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from trimode import plugins
from trimode.runtime.executors.base import Executor, register_executor
from trimode.runtime.executors.engine_dir import check_engine_dir, tensor_parallel_size
from trimode.runtime.executors.onnx_executor import graph_feeds, run_by_engine_kind
from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.passes import SeqPass


class _Context:
    def __init__(self, engine, profile: int, stream: torch.cuda.Stream) -> None:
        self.engine = engine
        self.context = engine.create_execution_context()
        self.context.set_optimization_profile_async(profile, stream.cuda_stream)
        self.inputs = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                       if engine.get_tensor_mode(engine.get_tensor_name(i)).name == "INPUT"}


@register_executor("tensorrt")
class TensorRTExecutor(Executor):
    def __init__(self, engine_dir: str | Path, cache: PagedKVCache, model=None, check: bool = True) -> None:
        import tensorrt as trt

        self.engine_dir = Path(engine_dir)
        manifest = check_engine_dir(self.engine_dir, page_size=cache.page_size) if check else \
            check_engine_dir(self.engine_dir, verify_hashes=False)
        if not manifest.get("tensorrt"):
            raise ValueError(f"engine directory {self.engine_dir} has no TensorRT engines (stage "
                             f"{manifest['stage']!r}): finish it with scripts/build_engine.py --from-onnx "
                             f"{self.engine_dir}")
        if tensor_parallel_size(manifest) > 1:
            raise ValueError(f"engine directory {self.engine_dir} holds {tensor_parallel_size(manifest)} ranks' engines; "
                             f"the TensorRT executor runs single-rank engines only (a --tp engine's DistCollective "
                             f"layers need an NCCL communicator per context, IExecutionContext.set_communicator, "
                             f"which this runtime does not create yet): run it with the onnxruntime executor, or "
                             f"build with --tp 1")
        if cache.k_pool.device.type != "cuda":
            raise ValueError("the TensorRT executor needs the KV pool on a CUDA device")
        plugins.register_tensorrt_plugins()
        self.cache, self.trt = cache, trt
        self.stream = torch.cuda.Stream()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engines: dict[str, object] = {}
        self.contexts: dict[str, _Context] = {}
        for kind, spec in manifest["tensorrt"]["engines"].items():
            plan = spec["plan"]
            if plan not in engines:
                engines[plan] = runtime.deserialize_cuda_engine((self.engine_dir / plan).read_bytes())
            self.contexts[kind] = _Context(engines[plan], spec["profile"], self.stream)
        self.engines = engines  # keep them alive: contexts reference them

    def _run(self, kind: str, passes: list[SeqPass]) -> torch.Tensor:
        ctx, cache = self.contexts[kind], self.cache
        unified = "is_causal" in ctx.inputs
        keeps = passes[0].kind.keeps_kv
        feeds = graph_feeds(passes, cache, keeps or unified, "lora_mask" in ctx.inputs)
        if unified:
            feeds["is_causal"] = np.array(passes[0].kind.is_causal)
            if not keeps:
                feeds["slot_mapping"] = np.full(len(feeds["input_ids"]), -1, np.int64)  # written nowhere
        device = cache.k_pool.device
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feeds.items() if k in ctx.inputs}
        c = ctx.context
        for name, t in tensors.items():
            c.set_input_shape(name, tuple(t.shape))
            c.set_tensor_address(name, t.data_ptr())
        for layer in range(cache.k_pool.shape[0]):
            for which, pool in (("k", cache.k_pool), ("v", cache.v_pool)):
                ptr, shape = pool[layer].data_ptr(), tuple(pool[layer].shape)
                c.set_input_shape(f"{which}_pool.{layer}", shape)
                c.set_tensor_address(f"{which}_pool.{layer}", ptr)
                if f"{which}_pool_out.{layer}" in {ctx.engine.get_tensor_name(i)
                                                  for i in range(ctx.engine.num_io_tensors)}:
                    c.set_tensor_address(f"{which}_pool_out.{layer}", ptr)  # aliased: in place
        logits = torch.empty(tuple(c.get_tensor_shape("logits")), dtype=torch.float32, device=device)
        c.set_tensor_address("logits", logits.data_ptr())
        with torch.cuda.stream(self.stream):
            if not c.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution of the {kind} engine failed")
        self.stream.synchronize()
        return logits

    @torch.no_grad()
    def forward(self, passes: Sequence[SeqPass]) -> list[torch.Tensor]:
        def run(kind: str, batch: list[SeqPass]) -> torch.Tensor:
            if kind not in self.contexts:
                raise ValueError(f"engine directory {self.engine_dir} has no {kind!r} engine")
            return self._run(kind, batch)

        return run_by_engine_kind(passes, run)

"""The onnxruntime executor: an engine directory's reference-form graphs on CPU, one session per engine kind.

Every session reads and writes the runtime's one ``PagedKVCache``: layer l's pool slices ``k_pool[l]`` /
``v_pool[l]`` are bound by address (I/O binding) as the graph's ``k_pool.{l}`` inputs and, for kinds that keep
K/V, as its ``k_pool_out.{l}`` outputs too, so the graphs' ScatterND writes land in place; the pool is never
copied. The weights are read once (memory-mapped from ``onnx/weights.bin``) and handed to every session as
shared initializers (``SessionOptions.add_initializer``), so they are resident once whatever the number of
kinds loaded. A forward whose passes need several kinds (e.g. AR decode and a draft in one batch) runs one
session per kind; passes of one sequence never span two kinds, so the order does not matter.

Tensor parallelism (an engine built with ``--tp N``): each rank runs its own graph set
(``onnx/rank<r>/``) on its share of the KV heads; the graphs' all-reduces are contrib ops that call this
process's ``TPComm`` (onnxruntime-extensions), and the ranks' vocabulary slices of the logits are gathered to
rank 0 after the forward. Every rank runs the same passes in the same order, so the collectives match.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from trimode.runtime.executors.base import Executor, register_executor
from trimode.runtime.executors.engine_dir import EngineMismatch, check_engine_dir, graph_dir, tensor_parallel_size
from trimode.runtime.executors.engine_kinds import PASS_TO_KIND  # which engine kind serves each pass kind
from trimode.runtime.executors.ort_ops import register_ort_contrib_ops, register_tp_comm
from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.passes import SeqPass

# a kind this engine directory lacks can be served by one computing the same graph with other shape ranges
SAME_GRAPH = {"prefill": ("verify", "decode"), "decode": ("verify", "prefill"), "verify": ("prefill", "decode")}


def run_by_engine_kind(passes: Sequence[SeqPass],
                       run: Callable[[str, list[SeqPass]], torch.Tensor]) -> list[torch.Tensor]:
    """Group the passes by the engine kind that serves them, ``run`` each group once (-> logits rows of its
    passes, in order), and return each pass's logits in the order of ``passes``."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(passes):
        groups[PASS_TO_KIND[p.kind]].append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(passes)
    for kind, idx in groups.items():
        batch = [passes[i] for i in idx]
        for i, lg in zip(idx, run(kind, batch).split([p.num_logits for p in batch])):
            out[i] = lg
    return out


def graph_feeds(passes: Sequence[SeqPass], cache: PagedKVCache, keeps_kv: bool, has_lora: bool
                ) -> dict[str, np.ndarray]:
    """The graph inputs (all but the pools) for ``passes`` in this order (docs: build/onnx_graph.py)."""
    ids = np.array([t for p in passes for t in p.token_ids], dtype=np.int64)
    positions = np.concatenate([np.arange(p.start_pos, p.end_pos, dtype=np.int64) for p in passes])
    lens = [p.num_tokens for p in passes]
    ends = np.cumsum(lens)
    feeds = {
        "input_ids": ids, "positions": positions,
        "block_tables": cache.block_table_tensor([p.seq_id for p in passes]).cpu().numpy(),
        "context_lens": np.array([p.start_pos for p in passes], dtype=np.int32),
        "query_start": np.concatenate([[0], ends]).astype(np.int32),
        "logits_index": np.concatenate([np.arange(e - p.num_logits, e) for p, e in zip(passes, ends)]).astype(np.int64),
    }
    if has_lora:
        feeds["lora_mask"] = np.concatenate([np.full(p.num_tokens, float(p.use_lora), np.float32) for p in passes])
    if keeps_kv:
        feeds["slot_mapping"] = torch.cat([cache.slots(p.seq_id, p.start_pos, p.num_tokens, torch.device("cpu"))
                                           for p in passes]).numpy().astype(np.int64)
    return feeds


def _external_initializers(model_path: Path) -> list[tuple[str, str, int, int, int, tuple[int, ...]]]:
    """(name, location, offset, length, onnx dtype, shape) of the external initializers of a graph."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    out = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            out.append((t.name, info["location"], int(info.get("offset", 0)), int(info["length"]), t.data_type,
                        tuple(t.dims)))
    return out


class SharedInitializers:
    """The weights of an engine directory, memory-mapped once and wrapped as OrtValues shared by all sessions."""

    def __init__(self, onnx_dir: Path) -> None:
        self.dir = onnx_dir
        self._maps: dict[str, np.memmap] = {}
        self.values: dict[str, object] = {}

    def for_graph(self, model_path: Path) -> dict[str, object]:
        import onnx
        import onnxruntime as ort
        from onnx.helper import tensor_dtype_to_np_dtype

        out = {}
        for name, location, offset, length, dtype, shape in _external_initializers(model_path):
            if name not in self.values:
                if location not in self._maps:
                    self._maps[location] = np.memmap(self.dir / location, dtype=np.uint8, mode="r")
                raw = self._maps[location][offset:offset + length]
                if dtype in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
                    self.values[name] = None  # packed sub-byte: no OrtValue over it; the session reads the file
                elif dtype == onnx.TensorProto.FLOAT8E4M3FN:
                    self.values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw.reshape(shape), dtype)
                else:
                    array = raw.view(tensor_dtype_to_np_dtype(dtype)).reshape(shape)
                    self.values[name] = ort.OrtValue.ortvalue_from_numpy(array)
            if self.values[name] is not None:
                out[name] = self.values[name]
        return out


_ENV_ALLOCATOR = False


def _shared_arena() -> None:
    """One CPU arena for every session of the process (sessions run one after another, so their activations
    can share it) instead of one arena per session."""
    global _ENV_ALLOCATOR
    if _ENV_ALLOCATOR:
        return
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
    _ENV_ALLOCATOR = True


class _KindSession:
    def __init__(self, kind: str, path: Path, shared: SharedInitializers, threads: int | None,
                 collectives: bool = False) -> None:
        import onnxruntime as ort

        _shared_arena()
        so = ort.SessionOptions()
        if collectives:  # the tensor-parallel all-reduce contrib op (build/plugin_ops.py)
            from onnxruntime_extensions import get_library_path

            register_ort_contrib_ops()
            so.register_custom_ops_library(get_library_path())
        so.add_session_config_entry("session.use_env_allocators", "1")
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # fp32 math for int4 weights
        so.add_session_config_entry("session.disable_prepacking", "1")  # prepacked copies would be per session
        if threads:
            so.intra_op_num_threads = threads
        for name, value in shared.for_graph(path).items():
            so.add_initializer(name, value)
        self.kind = kind
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = {i.name for i in self.session.get_inputs()}
        self.keeps_kv = "slot_mapping" in names
        self.has_lora = "lora_mask" in names
        self.binding = self.session.io_binding()


@register_executor("onnxruntime")
class OnnxRuntimeExecutor(Executor):
    """Runs passes through the reference-form graphs of an engine directory (see the module docstring)."""

    def __init__(self, engine_dir: str | Path, cache: PagedKVCache, model=None, kinds: Sequence[str] | None = None,
                 threads: int | None = None, check: bool = True, comm=None) -> None:
        self.engine_dir = Path(engine_dir)
        self.manifest = check_engine_dir(self.engine_dir, page_size=cache.page_size) if check else None
        manifest = self.manifest or check_engine_dir(self.engine_dir, verify_hashes=False)
        tp = tensor_parallel_size(manifest)
        world = comm.world_size if comm is not None else 1
        if tp != world:
            raise EngineMismatch("tensor_parallel.size", tp, world, self.engine_dir)
        self.comm = comm if world > 1 else None
        if cache.k_pool.dtype != torch.float32 or cache.k_pool.device.type != "cpu" or not cache.k_pool.is_contiguous():
            raise ValueError(f"the onnxruntime executor needs a contiguous float32 CPU KV pool, got "
                             f"{cache.k_pool.dtype} on {cache.k_pool.device}")
        self.cache = cache
        threads = threads or int(os.environ.get("TRIMODE_ORT_THREADS", "0")) or None
        available = manifest["engine_kinds"]
        wanted = list(kinds) if kinds is not None else list(available)
        onnx_dir = self.engine_dir / graph_dir(manifest, comm.rank if self.comm else 0)
        if self.comm is not None:
            register_tp_comm(self.comm)
        self.shared = SharedInitializers(onnx_dir)
        self.sessions = {k: _KindSession(k, onnx_dir / available[k]["reference"], self.shared, threads,
                                         collectives=self.comm is not None) for k in wanted}

    def _session_for(self, kind: str) -> _KindSession:
        if kind in self.sessions:
            return self.sessions[kind]
        for other in SAME_GRAPH.get(kind, ()):
            if other in self.sessions:
                return self.sessions[other]
        raise ValueError(f"engine directory {self.engine_dir} has no {kind!r} engine (built kinds: "
                         f"{sorted(self.sessions)}): rebuild it with the modes that need it")

    def _bind_pools(self, s: _KindSession) -> None:
        pool_shape = list(self.cache.k_pool.shape[1:])
        for layer in range(self.cache.k_pool.shape[0]):
            for which, pool in (("k", self.cache.k_pool), ("v", self.cache.v_pool)):
                ptr = pool[layer].data_ptr()  # a slice of the one pool: no copy
                s.binding.bind_input(f"{which}_pool.{layer}", "cpu", 0, np.float32, pool_shape, ptr)
                if s.keeps_kv:
                    s.binding.bind_output(f"{which}_pool_out.{layer}", "cpu", 0, np.float32, pool_shape, ptr)

    @torch.no_grad()
    def forward(self, passes: Sequence[SeqPass]) -> list[torch.Tensor]:
        out = run_by_engine_kind(passes, self._run_kind)
        if self.comm is None:
            return out
        # each rank holds a vocabulary slice: rank 0 gets the full rows (the others keep their slice)
        full = self.comm.gather_cat(torch.cat(out), dim=-1)
        return list(full.split([p.num_logits for p in passes]))

    def _run_kind(self, kind: str, batch: list[SeqPass]) -> torch.Tensor:
        s = self._session_for(kind)
        s.binding.clear_binding_inputs()
        s.binding.clear_binding_outputs()
        for name, value in graph_feeds(batch, self.cache, s.keeps_kv, s.has_lora).items():
            s.binding.bind_cpu_input(name, value)
        s.binding.bind_output("logits", "cpu")  # first: get_outputs()[0]
        self._bind_pools(s)
        s.session.run_with_iobinding(s.binding)
        return torch.from_numpy(s.binding.get_outputs()[0].numpy())

    def pool_pointers(self) -> dict[str, int]:
        """The data pointer every session binds for layer 0's K pool (tests: one and the same buffer)."""
        return {k: self.cache.k_pool[0].data_ptr() for k in self.sessions}

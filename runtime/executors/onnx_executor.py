"""The onnxruntime executor: an engine directory's reference-form graphs on CPU, one session per distinct graph.

Every session reads and writes the runtime's one ``PagedKVCache``: layer l's pool slices ``k_pool[l]`` /
``v_pool[l]`` are bound by address (I/O binding) as the graph's ``k_pool.{l}`` inputs and, for kinds that keep
K/V, as its ``k_pool_out.{l}`` outputs too, so the graphs' ScatterND writes land in place; the pool is never
copied. The weights are read once (memory-mapped from ``onnx/weights.bin``) and handed to every session as
shared initializers (``SessionOptions.add_initializer``), so they are resident once whatever the number of
kinds loaded. Kinds computing the same graph (prefill, decode, verify) share one session. A forward whose passes
need several graphs (e.g. AR decode and a draft in one batch) runs one session per graph; passes of one sequence
never span two, so the order does not matter.

Threads: onnxruntime's intra-op pool runs the forward with ``threads`` (runtime.settings.ThreadPlan), torch
keeps one thread for the host work between passes, and the pool's threads do not spin between runs
(``session.intra_op.allow_spinning`` 0), so neither pool takes the other's cores. The pools and the outputs are
bound once per session; a forward binds only its feeds, built from host-side lists.

Tensor parallelism (an engine built with ``--tp N``): each rank runs its own graph set
(``onnx/rank<r>/``) on its share of the KV heads; the graphs' all-reduces are contrib ops that call this
process's ``TPComm`` (onnxruntime-extensions), and the ranks' vocabulary slices of the logits are gathered to
rank 0 after the forward. Every rank runs the same passes in the same order, so the collectives match.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from itertools import accumulate
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from trimode.runtime.executors.base import Executor, register_executor
from trimode.runtime.executors.decisions import DECISION_OUTPUTS, decision_feeds
from trimode.runtime.executors.engine_dir import EngineMismatch, check_engine_dir, graph_dir, tensor_parallel_size
from trimode.runtime.executors.engine_kinds import ENGINE_KINDS, PASS_TO_KIND  # PASS_TO_KIND: pass -> engine kind
from trimode.runtime.executors.ort_ops import register_ort_contrib_ops, register_tp_comm
from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.passes import PassOutput, SeqPass, split_outputs
from trimode.runtime.settings import ThreadPlan

# a kind this engine directory lacks can be served by one computing the same graph with other shape ranges
SAME_GRAPH = {"prefill": ("verify", "decode"), "decode": ("verify", "prefill"), "verify": ("prefill", "decode")}


def run_by_engine_kind(passes: Sequence[SeqPass], run: Callable[[str, list[SeqPass]], list[PassOutput]],
                       same: Callable[[str], str] | None = None) -> list[PassOutput]:
    """Group the passes by the engine kind that serves them (``same(kind)``: the kind whose graph runs it, when
    several share one), ``run`` each group once (-> an output per pass of the group, in order), the groups whose
    passes keep K/V first, and return each pass's output in the order of ``passes``."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(passes):
        kind = PASS_TO_KIND[p.kind]
        groups[same(kind) if same else kind].append(i)
    out: list[PassOutput] = [PassOutput()] * len(passes)
    # graphs that keep K/V run first: a fused spec step's sub-blocks (draft graph) read its chain's K/V (verify
    # graph) from the pool (docs/kernels.md, "Fused self-speculation pass")
    for kind, idx in sorted(groups.items(), key=lambda g: not any(passes[i].kind.keeps_kv for i in g[1])):
        for i, o in zip(idx, run(kind, [passes[i] for i in idx]), strict=True):
            out[i] = o
    return out


def graph_feeds(passes: Sequence[SeqPass], cache: PagedKVCache, keeps_kv: bool, has_lora: bool
                ) -> dict[str, np.ndarray]:
    """The graph inputs (all but the pools) for ``passes`` in this order (docs: build/onnx_graph.py): the
    decision inputs (``decision_feeds``) included, whichever graph takes them; ``logits_index`` holds the rows of
    the passes that do not decide."""
    tables = [cache.block_table(p.seq_id) for p in passes]
    width = max([len(t) for t in tables] + [1])
    ends = list(accumulate(p.num_tokens for p in passes))
    feeds = {
        "input_ids": np.array([t for p in passes for t in p.token_ids], dtype=np.int64),
        "positions": np.array([i for p in passes for i in range(p.start_pos, p.end_pos)], dtype=np.int64),
        "block_tables": np.array([t + [-1] * (width - len(t)) for t in tables], dtype=np.int32),
        "context_lens": np.array([p.start_pos for p in passes], dtype=np.int32),
        "query_start": np.array([0, *ends], dtype=np.int32),
        "logits_index": np.array([i for p, e in zip(passes, ends) if not p.decide
                                  for i in range(e - p.num_logits, e)], dtype=np.int64),
        **decision_feeds(passes),
    }
    if has_lora:
        feeds["lora_mask"] = np.array([float(p.use_lora) for p in passes for _ in range(p.num_tokens)], np.float32)
    if keeps_kv:
        size = cache.page_size
        feeds["slot_mapping"] = np.array([t[i // size] * size + i % size for p, t in zip(passes, tables)
                                          for i in range(p.start_pos, p.end_pos)], dtype=np.int64)
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
_CREATE_LOCK = threading.Lock()


def _shared_arena() -> None:
    """One CPU arena for every session of the process (sessions run one after another, so their activations
    can share it) instead of one arena per session."""
    global _ENV_ALLOCATOR
    import onnxruntime as ort

    with _CREATE_LOCK:
        if not _ENV_ALLOCATOR:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _ENV_ALLOCATOR = True


class _KindSession:
    def __init__(self, kind: str, path: Path, shared: SharedInitializers, threads: int,
                 collectives: bool = False, prepack: bool = False, spin: bool = False) -> None:
        import onnxruntime as ort

        _shared_arena()
        so = ort.SessionOptions()
        if collectives:  # the tensor-parallel all-reduce contrib op (build/plugin_ops.py)
            from onnxruntime_extensions import get_library_path

            register_ort_contrib_ops()
            with _CREATE_LOCK:
                so.register_custom_ops_library(get_library_path())
        so.add_session_config_entry("session.use_env_allocators", "1")
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # fp32 math for int4 weights
        # prepacked weights are copies per session; without them MatMul packs the weights on every run of more
        # than one token (measured on the tiny model: a 16-token pass 1.4x slower, a 1-token pass unchanged)
        so.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1  # sequential execution: the inter-op pool would only add idle threads
        # the pool's threads sleep between runs unless ``spin`` (onnxruntime's default): spinning saves a wake-up
        # per run on an idle machine and takes the cores from the host work in between (runtime.settings.ThreadPlan)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        for name, value in shared.for_graph(path).items():
            so.add_initializer(name, value)
        self.kind = kind
        with _CREATE_LOCK:  # sessions are made one at a time (thread ranks: two at once crashed onnxruntime)
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = {i.name for i in self.session.get_inputs()}
        self.keeps_kv = "slot_mapping" in names
        self.has_lora = "lora_mask" in names
        self.inputs = names
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.decides = "decide_index" in names  # graphs of GRAPH_VERSION >= 3 (single rank) end in the decisions
        self.results = ("logits", *(o for o in DECISION_OUTPUTS if o in self.outputs))  # bound first, in this order
        self.binding = self.session.io_binding()


@register_executor("onnxruntime")
class OnnxRuntimeExecutor(Executor):
    """Runs passes through the reference-form graphs of an engine directory (see the module docstring)."""

    def __init__(self, engine_dir: str | Path, cache: PagedKVCache, model=None, kinds: Sequence[str] | None = None,
                 threads: int | None = None, check: bool = True, comm=None, prepack: bool = False,
                 spin: bool = False) -> None:
        """Sessions for ``kinds`` (default: every kind the engine directory has) over ``cache``; kinds computing
        the same graph (prefill, decode, verify: runtime.executors.engine_kinds) share one session. ``threads``
        (0 / None: runtime.settings.resolve_threads for the size of the weights files) is onnxruntime's intra-op
        pool; torch is set to one thread (process-wide). ``prepack`` lets each session keep a prepacked copy of the
        weights (faster passes of more than one token; the weights are then resident once per distinct graph plus
        once shared); ``spin`` keeps the pool's threads spinning between runs (onnxruntime's default; off here,
        see ThreadPlan).
        ``check=False`` skips the manifest's hash check (the assembly has checked it)."""
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
        available = manifest["engine_kinds"]
        wanted = list(kinds) if kinds is not None else list(available)
        onnx_dir = self.engine_dir / graph_dir(manifest, comm.rank if self.comm else 0)
        if self.comm is not None:
            register_tp_comm(self.comm)
        self.shared = SharedInitializers(onnx_dir)
        weight_bytes = sum(f.stat().st_size for f in onnx_dir.glob("*.bin"))
        self.plan = ThreadPlan.for_executor("onnxruntime", threads, weight_bytes)
        self.threads = self.plan.executor_threads
        self.plan.apply()
        self.prepack = prepack
        self.sessions: dict[str, _KindSession] = {}
        by_graph: dict[tuple[bool, bool, bool], _KindSession] = {}
        for k in wanted:
            spec = ENGINE_KINDS[k]
            graph = (spec.is_causal, spec.keeps_kv, spec.has_lora)  # what build/onnx_graph.py builds from
            if graph not in by_graph:
                by_graph[graph] = _KindSession(k, onnx_dir / available[k]["reference"], self.shared, self.threads,
                                               collectives=self.comm is not None, prepack=prepack, spin=spin)
                self._bind_pools(by_graph[graph])
            self.sessions[k] = by_graph[graph]
        self.decides = all(s.decides for s in self.sessions.values())  # (--tp graphs hold a vocabulary slice: no)

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
        for name in s.results:  # first: get_outputs()[:len(s.results)]
            s.binding.bind_output(name, "cpu")
        for layer in range(self.cache.k_pool.shape[0]):
            for which, pool in (("k", self.cache.k_pool), ("v", self.cache.v_pool)):
                ptr = pool[layer].data_ptr()  # a slice of the one pool: no copy
                s.binding.bind_input(f"{which}_pool.{layer}", "cpu", 0, np.float32, pool_shape, ptr)
                if s.keeps_kv:
                    s.binding.bind_output(f"{which}_pool_out.{layer}", "cpu", 0, np.float32, pool_shape, ptr)

    @torch.no_grad()
    def forward(self, passes: Sequence[SeqPass]) -> list[PassOutput]:
        if not self.decides and any(p.decide for p in passes):
            raise ValueError("these graphs do not decide (a --tp graph set, or graphs built before GRAPH_VERSION 3): "
                             "passes must not ask for decisions")
        out = run_by_engine_kind(passes, self._run_kind, lambda kind: self._session_for(kind).kind)
        if self.comm is None:
            return self.count(out)
        # each rank holds a vocabulary slice: rank 0 gets the full rows (the others keep their slice)
        full = self.comm.gather_cat(torch.cat([o.logits for o in out]), dim=-1)
        return self.count([PassOutput(logits=lg) for lg in full.split([p.num_logits for p in passes])])

    def _run_kind(self, kind: str, batch: list[SeqPass]) -> list[PassOutput]:
        s = self._session_for(kind)  # pools are bound (__init__); a run rebinds its feeds and its outputs
        for name, value in graph_feeds(batch, self.cache, s.keeps_kv, s.has_lora).items():
            if name in s.inputs:
                s.binding.bind_cpu_input(name, value)
        for name in s.results:
            s.binding.bind_output(name, "cpu")  # unallocated again (same place): shapes change from run to run
        s.session.run_with_iobinding(s.binding)
        values = dict(zip(s.results, (v.numpy() for v in s.binding.get_outputs()[:len(s.results)])))
        return split_outputs(batch, torch.from_numpy(values["logits"]), values.get("accepted"), values.get("bonus"),
                             values.get("unmask_tokens"), values.get("unmask_confidence"))

    def pool_pointers(self) -> dict[str, int]:
        """The data pointer every session binds for layer 0's K pool (tests: one and the same buffer)."""
        return {k: self.cache.k_pool[0].data_ptr() for k in self.sessions}

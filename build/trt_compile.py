"""The TensorRT stage: plugin-form ONNX graphs -> serialized engines (plans), with TensorRT-RTX or TensorRT 11.

Which TensorRT builds depends on the target (``build/targets.py``, ``plugins/tensorrt_libs.py``):

- ``--target spark`` (SM121) and ``--target rtx`` (SM86, SM89, SM120, SM121, one portable plan): **TensorRT-RTX**.
  Its builder runs ahead of time **without a GPU** (this is how the tests build real engines on CPU);
  ``IBuilderConfig.set_compute_capability`` names the targets, and the plan's header records them
  (``tensorrt_libs.rtx_plan_header``). The plugins are the class-based ``IPluginV3`` plugins of
  ``plugins/trt_plugins.py``, registered in the building process; TensorRT-RTX's ONNX parser aborts a process
  that meets a plugin node without ``libtensorrt_rtx.so`` on its loader path, so ``build_engines`` runs the
  stage in a child process started with that path (``tensorrt_libs.child_env``), which also keeps
  TensorRT-RTX's libraries out of the caller's process (``tensorrt_libs.flavour_available``).
- ``--target hopper`` / ``blackwell`` (SM90 / SM100): **TensorRT 11**, written against its documented Python API
  (strongly typed networks; the same ``IPluginV3`` classes). TensorRT 11 cannot be installed on the project's
  machines (PyPI has placeholders only) and its builder needs the GPU, so this path is exercised against a
  stand-in (tests/fake_tensorrt.py) and ``tensorrt_status`` says why the stage is skipped.

Precision comes from the graphs' types and ModelOpt's Q/DQ nodes (FP8, INT4 AWQ), never from builder flags; a
recipe a target's GPUs cannot run (FP8 on SM86, say) is refused by the builder, and ``EngineBuildError`` says so
in one line naming the target and the recipe.

Graphs reach TensorRT **kv-first** (``wire_kv_first``): ``kv_append`` writes the pool in place (its outputs alias
its pool inputs), which TensorRT accepts only if nothing else reads the pool input, so the layer's attention
reads ``kv_append``'s output pool instead. Same result: attention reads pool rows below ``context_lens``,
``kv_append`` writes only rows at or above them (the new tokens' slots), and the new tokens reach attention as
``k_new`` / ``v_new``.

Layouts. ``shared`` (default): **one engine** from ``unified.plugin.onnx`` (every kind in one network:
``is_causal`` selects the attention pattern through an ``If``, ``kv_append`` skips slot -1, the LoRA is gated)
with **one optimization profile per engine kind** (its token range from the build's batch and sequence limits);
weights are resident once, shared by the execution contexts of the kinds. ``per-kind``: one engine per kind
graph (weights once per engine), for a TensorRT that rejects plugins inside ``If``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trimode.build.targets import get_target
from trimode.plugins import tensorrt_libs, trt_plugins
from trimode.runtime.executors.engine_kinds import token_range

LAYOUTS = ("shared", "per-kind")


class EngineBuildError(RuntimeError):
    """The TensorRT stage failed; the message is one line naming the plan, the target and the recipe."""


def tensorrt_status(target: str = "hopper") -> tuple[bool, str]:
    """(usable, reason): can this machine build ``target``'s engines? TensorRT-RTX targets need only the
    ``tensorrt_rtx`` module (no GPU); TensorRT 11 targets need ``tensorrt`` and a CUDA GPU."""
    flavour = tensorrt_libs.get_flavour(get_target(target).flavour)
    available, why = tensorrt_libs.flavour_available(flavour.name)  # (not imported here: see flavour_available)
    if not available:
        return False, why
    if flavour.needs_gpu_to_build:
        try:
            import torch

            if not torch.cuda.is_available():
                return False, f"no CUDA GPU is visible ({flavour.title} builds on the GPU it targets)"
        except ImportError:
            return False, "torch is not installed"
    return True, "ok"


def profile_shapes(kind: str, manifest_shapes: dict[str, int], num_layers: int) -> dict[str, tuple]:
    """(min, opt, max) shapes of every dynamic input for the optimization profile of ``kind``.

    The logits rows and the decision inputs (``build/onnx_decisions.py``) start at 0: a forward may return no
    logits and decide nothing. Decisions: ``decide_index`` up to the kind's tokens; causal kinds verify at most
    one pass per sequence slot (``max_batch``) of at most ``block_length`` drafts (prefill, decode: none; a longer
    verify pass takes logits, ``runtime.engine.Engine``); a draft forward verifies nothing (its profile holds Nd = 0, Bd - 1 = 0)."""
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
        "logits_index": ((0,), (t_opt,), (t_max,)),
        "decide_index": ((0,), (t_opt if kind in ("draft", "verify") else n_opt,), (t_max,)),
    }
    # verified passes (Nd) and drafts per pass (W = Bd - 1): opt / max
    nd_opt, nd_max = (0, 0) if kind == "draft" else (n_opt, b)
    w_opt, w_max = (blk, blk) if kind == "verify" else (0, 0)  # prefill and decode passes have no drafts
    shapes.update({"draft_lens": ((0,), (nd_opt,), (nd_max,)),
                   "draft_tokens": ((0, 0), (nd_opt, w_opt), (nd_max, w_max)),
                   "verify_gather": ((0,), (nd_opt * (w_opt + 1),), (nd_max * (w_max + 1),))})
    heads = manifest_shapes.get("num_kv_heads_per_rank", manifest_shapes["num_kv_heads"])  # --tp: this rank's
    pool = lambda n: (n, page, heads, manifest_shapes["head_dim"])  # noqa: E731
    for layer in range(num_layers):
        for which in "kv":
            shapes[f"{which}_pool.{layer}"] = (pool(1), pool(total_pages), pool(total_pages))
    return shapes


def wire_kv_first(model):
    """Rewire a plugin-form ONNX model (in place; returned) so that each ``kv_append`` runs before the other
    readers of its pool inputs and they read its output pools: every use of ``k_pool.{l}`` / ``v_pool.{l}`` other
    than ``kv_append``'s own (the attention node, inside ``If`` branches too) becomes ``k_pool_out.{l}`` /
    ``v_pool_out.{l}``, and the ``kv_append`` node moves before its first consumer. A model already wired so
    (or without ``kv_append``) is returned unchanged. See the module docstring for why this is the same math."""
    graph = model.graph
    appends = [n for n in graph.node if n.op_type == "kv_append"]
    if not appends:
        return model
    renames = {}
    for node in appends:
        renames.update({node.input[2]: node.output[0], node.input[3]: node.output[1]})

    def rewire(g) -> None:
        for node in g.node:
            if node.op_type != "kv_append":
                for i, name in enumerate(node.input):
                    if name in renames:
                        node.input[i] = renames[name]
            for attr in node.attribute:
                if attr.g.node:
                    rewire(attr.g)

    rewire(graph)

    def reads(node, names: set[str]) -> bool:
        return bool(set(node.input) & names) or any(reads(n, names) for a in node.attribute for n in a.g.node)

    order = list(graph.node)
    for node in appends:
        order.remove(node)
        outputs = set(node.output)
        first = next((i for i, n in enumerate(order) if reads(n, outputs)), len(order))
        producers = set(node.input)  # its inputs (k, v) must still be computed before it
        last_producer = max((i for i, n in enumerate(order[:first]) if set(n.output) & producers), default=-1)
        if last_producer >= first:
            raise ValueError(f"cannot wire {node.name} kv-first: its inputs are computed after its first reader")
        order.insert(first, node)
    del graph.node[:]
    graph.node.extend(order)
    return model


def compute_capabilities(trt, target: str) -> list[str]:
    """The compute capabilities a plan for ``target`` is built for: the target's list for TensorRT-RTX, the
    build GPU's for TensorRT 11 (a TensorRT 11 plan runs on the architecture it was built on)."""
    t = get_target(target)
    if t.flavour == "tensorrt-rtx":
        return list(t.compute_capabilities)
    import torch

    if not torch.cuda.is_available():  # (the TensorRT 11 builder will say so; recorded as the target's)
        return list(t.compute_capabilities)
    return [tensorrt_libs.compute_capability_name(*torch.cuda.get_device_capability())]


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


def _logger(trt):
    """A TensorRT logger that keeps the errors (for one-line messages) and prints nothing below ERROR."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))
                print(f"[TensorRT] {msg}", file=sys.stderr, flush=True)

    return Logger()


def _first_error(errors: list[str]) -> str:
    """The most telling builder error, on one line."""
    if not errors:
        return "no error message (see the log above)"
    text = errors[-1] if len(errors) == 1 else next((e for e in errors if "Error Code" in e), errors[0])
    return " ".join(text.split())[:400]


def build_engines(onnx_dir: Path, out_dir: Path, kinds: list[str], shapes: dict[str, int], num_layers: int,
                  layout: str = "shared", workspace_gb: float = 8.0, plan_prefix: str = "trt/",
                  num_ranks: int = 1, target: str = "hopper", recipe: str = "none") -> dict[str, Any]:
    """Compile the plugin-form graphs of ``onnx_dir`` into ``out_dir`` (``engine.plan`` or ``<kind>.plan``) for
    ``target``; returns the manifest's ``tensorrt`` section: ``flavour`` ("tensorrt-rtx" / "tensorrt"),
    ``version``, ``compute_capabilities`` (e.g. ["SM121"]), ``layout``, ``engines`` {kind: {plan, profile}},
    ``plans`` {plan file: {bytes, seconds, header_targets (TensorRT-RTX)}}. ``num_ranks`` > 1: one rank's graph
    set of a ``--tp`` build (TensorRT 11), whose all-reduce nodes become NCCL ``DistCollective`` layers.

    Raises EngineBuildError (one line) when TensorRT rejects a graph or refuses to build a plan, ValueError for
    an unknown layout. TensorRT-RTX builds always run in a child process started with ``libtensorrt_rtx.so`` on
    its loader path: the caller's process never loads TensorRT-RTX (``tensorrt_libs.flavour_available``) and a
    builder that aborts or crashes becomes an EngineBuildError."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown TensorRT layout {layout!r}; choose from {LAYOUTS}")
    job = {"onnx_dir": str(onnx_dir), "out_dir": str(out_dir), "kinds": list(kinds), "shapes": dict(shapes),
           "num_layers": num_layers, "layout": layout, "workspace_gb": workspace_gb, "plan_prefix": plan_prefix,
           "num_ranks": num_ranks, "target": target, "recipe": recipe}
    if get_target(target).flavour == "tensorrt-rtx":
        return _build_in_child(job)
    return _build(**job)


def _build_in_child(job: dict[str, Any]) -> dict[str, Any]:
    """``_build`` in a child interpreter started with ``libtensorrt_rtx.so`` on its loader path."""
    cmd = [sys.executable, "-m", "trimode.build.trt_compile"]
    r = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, env=tensorrt_libs.child_env())
    if r.stderr:
        sys.stderr.write(r.stderr)
    if r.returncode == 0:
        return json.loads(r.stdout.strip().splitlines()[-1])
    errors = [line[len("error: "):] for line in r.stderr.splitlines() if line.startswith("error: ")]
    if errors:
        raise EngineBuildError(errors[-1])
    how = f"was killed by signal {-r.returncode}" if r.returncode < 0 else f"exited with status {r.returncode}"
    tail = " ".join(r.stderr.strip().splitlines()[-1:])[:300]
    raise EngineBuildError(f"the TensorRT-RTX build process for --target {job['target']} --quant {job['recipe']} "
                           f"{how}: {tail or 'no output'}")


def _build(onnx_dir: str, out_dir: str, kinds: list[str], shapes: dict[str, int], num_layers: int, layout: str,
           workspace_gb: float, plan_prefix: str, num_ranks: int, target: str, recipe: str) -> dict[str, Any]:
    import onnx

    tgt = get_target(target)
    flavour = tensorrt_libs.get_flavour(tgt.flavour)
    trt = tensorrt_libs.import_tensorrt(flavour.name)
    rtx = flavour.name == "tensorrt-rtx"
    if rtx:
        tensorrt_libs.require_loader_path(f"building --target {target} engines")
    trt_plugins.register(trt)
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    logger = _logger(trt)
    out_dir.mkdir(parents=True, exist_ok=True)
    builder = trt.Builder(logger)
    caps = compute_capabilities(trt, target)
    cache_path = out_dir / "timing.cache"
    cache = None

    def new_config():
        nonlocal cache
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        aliased_io = getattr(trt.PreviewFeature, "ALIASED_PLUGIN_IO_10_03", None)  # kv_append in place
        if aliased_io is not None:  # (a preview feature since TensorRT 10.3; kept in TensorRT-RTX 1.7)
            config.set_preview_feature(aliased_io, True)
        if rtx:
            config.num_compute_capabilities = len(caps)
            for i, cc in enumerate(caps):
                config.set_compute_capability(getattr(trt.ComputeCapability, cc), i)
        else:  # TensorRT 11: tactic timings kept between plans and rebuilds (TensorRT-RTX does not time tactics)
            if cache is None:
                cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
        return config

    def network_from(path: Path):
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        model = wire_kv_first(onnx.load(str(path), load_external_data=False))
        if not parser.parse(model.SerializeToString(), str(path)):  # the path locates the external weights
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"{flavour.title}'s ONNX parser rejected {path.name}: {' '.join(errors.split())}")
        if num_ranks > 1:
            _check_collectives(trt, network, num_ranks, path, expected=2 * num_layers + 1)
        return network

    def add_profile(network, config, kind: str) -> int:
        profile = builder.create_optimization_profile()
        wanted = profile_shapes(kind, shapes, num_layers)
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            if name in wanted:
                profile.set_shape(name, *wanted[name])
        return config.add_optimization_profile(profile)

    result: dict[str, Any] = {"flavour": flavour.name, "version": str(trt.__version__), "compute_capabilities": caps,
                              "layout": layout, "engines": {}, "plans": {}}
    jobs = [("engine.plan", "unified.plugin.onnx", kinds)] if layout == "shared" else \
        [(f"{k}.plan", f"{k}.plugin.onnx", [k]) for k in kinds]
    for plan_name, graph, plan_kinds in jobs:
        print(f"tensorrt: {flavour.title} {trt.__version__} building {plan_name} from {graph} for "
              f"{', '.join(caps)} (profiles: {', '.join(plan_kinds)})", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        config = new_config()
        network = network_from(onnx_dir / graph)
        profiles = {k: add_profile(network, config, k) for k in plan_kinds}
        logger.errors.clear()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"{flavour.title} {trt.__version__} refused to build {plan_name} for --target "
                                   f"{target} ({', '.join(caps)}) with --quant {recipe}: "
                                   f"{_first_error(logger.errors)}")
        data = bytes(serialized)
        (out_dir / plan_name).write_bytes(data)
        entry: dict[str, Any] = {"bytes": len(data), "seconds": round(time.perf_counter() - t0, 3)}
        if rtx:
            entry["header_targets"] = tensorrt_libs.rtx_plan_header(data)["targets"]
        result["plans"][f"{plan_prefix}{plan_name}"] = entry
        for kind, index in profiles.items():
            result["engines"][kind] = {"plan": f"{plan_prefix}{plan_name}", "profile": index}
    if cache is not None:
        cache_path.write_bytes(bytes(cache.serialize()))
    return result


def main() -> int:
    """Child-process entry (``python -m trimode.build.trt_compile``): a ``_build`` job as JSON on stdin; the
    ``tensorrt`` section as the last stdout line; ``error: <one line>`` on stderr and status 3 on failure."""
    job = json.loads(sys.stdin.read())
    try:
        section = _build(**job)
    except (EngineBuildError, tensorrt_libs.LoaderPathError, tensorrt_libs.TensorRTUnavailable) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    print(json.dumps(section), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

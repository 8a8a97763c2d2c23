"""Build an engine directory for a tri-mode (NLD) checkpoint: quantize, export ONNX per engine kind, compile
TensorRT engines where TensorRT and a GPU exist, and write the manifest last.

    python scripts/build_engine.py --model models/tiny-kjv --quant fp8 --modes ar,diffusion,spec \\
        --block-length 32 --max-batch 8 --max-seq 4096 --target hopper --out engines/tiny-kjv-fp8
    python scripts/build_engine.py --from-onnx engines/tiny-kjv-fp8        # on a GPU host: TensorRT stage only

Without TensorRT (CPU machines) the build stops after the ONNX stage and prints the command that finishes it.
``--tp N`` writes one graph set (and, with TensorRT, one engine set) per tensor-parallel rank, recorded in the
manifest; run it with ``mpiexec -n N trimode generate --engine DIR --tp N``. Every build prints the per-GPU
memory budget (weights, KV pages, activations) of the real 3B/8B/14B configs and the given model at ``--tp``
on the target's GPU (``--gpu-gb``); ``--target spark`` selects w4a16 and budgets 128 GB of unified memory.
Quantized builds calibrate on ``--calib-text``, ``--calib-file``, ``--calib-dataset NAME[:CONFIG]`` (a Hugging Face
dataset; needs ``pip install datasets`` and access to its hub), the checkpoint's own ``calibration.txt`` /
``heldout.txt``, or else the King James Bible text shipped with trimode, and print which they used. Errors are one
line (exit status 2) and come before anything is written; a build that fails or is interrupted (Ctrl-C,
SIGTERM) removes what it wrote. The last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from trimode.build.pipeline import BuildError, BuildOptions, build, finish_from_onnx
from trimode.build.recipes import RECIPES
from trimode.build.targets import TARGETS
from trimode.build.trt_compile import LAYOUTS
from trimode.runtime.executors.engine_dir import EngineDirError


def memory_budget(model_dir: Path, opts: BuildOptions, gpu_gb: float | None = None) -> list[str]:
    """Per-GPU weights / KV pages / activations at ``--tp`` for 3B/8B/14B and the given model."""
    from trimode.build.memory_planner import REFERENCE_CONFIGS, plan_memory, smallest_tp
    from trimode.build.recipes import get_recipe
    from trimode.runtime.model.checkpoint import load_config
    from trimode.runtime.parallel.comm import TensorParallelConfigError

    target = TARGETS[opts.target]
    gpu_gb = gpu_gb or target.memory_gb
    reserve = target.reserve_gb  # GiB kept out of the KV pool (on unified memory: the OS and the CPU side)
    recipe = get_recipe(opts.recipe_name)  # its weight / KV formats are the planner's names ("fp8", "int4")
    dtype, kv_dtype = recipe.weights or "bfloat16", recipe.kv_cache or "bfloat16"
    configs = dict(REFERENCE_CONFIGS)
    configs[model_dir.name] = load_config(model_dir)
    where = (f"{target.device}: {gpu_gb:g} GiB unified, {reserve:g} GiB kept for the OS/CPU"
             if target.unified_memory else f"--target {opts.target}: {gpu_gb:g} GiB per GPU, --tp {opts.tp}")
    lines = [f"memory budget per GPU ({where}); {dtype} weights, {kv_dtype} KV, page {opts.page_size}, "
             f"{opts.max_batch} x {opts.max_seq} tokens per forward"]
    kw = dict(page_size=opts.page_size, context_length=opts.max_seq, max_num_tokens=opts.max_batch * opts.max_seq,
              reserve_gb=reserve)
    for name, cfg in configs.items():
        try:
            plan = plan_memory(cfg, opts.tp, dtype, kv_dtype, gpu_gb, model_name=name, **kw)
        except TensorParallelConfigError as e:
            lines.append(f"{name}: --tp {opts.tp} cannot split it ({e})")
            continue
        lines.append(plan.format())
        if not plan.fits:
            need = smallest_tp(cfg, dtype=dtype, kv_dtype=kv_dtype, gpu_memory_gb=gpu_gb, **kw)
            lines.append(f"  -> needs --tp {need}" if need else "  -> does not fit at any tensor-parallel size")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    target_recipes = "; ".join(f"{t.default_recipe} for --target {t.name}" for t in TARGETS.values()
                               if t.default_recipe != "none")
    p = argparse.ArgumentParser(prog="build_engine.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="NLD checkpoint directory (config.json + safetensors + tokenizer)")
    p.add_argument("--out", type=Path, help="engine directory to create")
    p.add_argument("--from-onnx", type=Path, metavar="DIR", help="add TensorRT engines to a finished ONNX-stage DIR")
    p.add_argument("--quant", default=None, metavar="RECIPE",
                   help=f"quantization recipe: {', '.join(RECIPES)} (default: none; {target_recipes})")
    p.add_argument("--modes", default="ar,diffusion,spec", help="comma-separated: ar, diffusion, spec")
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq", type=int, default=4096)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--target", default="hopper", help=f"GPU target: {', '.join(TARGETS)}")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: one graph/engine set per rank")
    p.add_argument("--gpu-gb", type=float, default=None,
                   help="memory per GPU for the budget (default by target: " +
                        ", ".join(f"{t.name} {t.memory_gb:g}" for t in TARGETS.values()) + ")")
    p.add_argument("--layout", default="shared", help=f"TensorRT engine layout: {', '.join(LAYOUTS)}")
    p.add_argument("--calib-file", type=Path, help="calibration text file (default: the checkpoint's calibration.txt "
                                                   "or heldout.txt, else trimode's shipped King James Bible text)")
    p.add_argument("--calib-text", help="calibration text given inline")
    p.add_argument("--calib-dataset", metavar="NAME[:CONFIG]",
                   help="calibrate on a Hugging Face dataset's text column, streamed (needs `pip install datasets`)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--quantize-head", action="store_true", help="quantize diffusion_head too (default: kept 16-bit)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out holding a different build (the old one stays until the new one is done)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the build, which removes what it wrote


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return _run(a)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(a)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(a: argparse.Namespace) -> int:
    try:
        if a.from_onnx is not None:
            manifest = finish_from_onnx(a.from_onnx, a.layout)
        else:
            if a.model is None or a.out is None:
                raise BuildError("--model and --out are required (or --from-onnx DIR)")
            opts = BuildOptions(model=a.model, out=a.out, recipe=a.quant, modes=tuple(a.modes.split(",")),
                                block_length=a.block_length, max_batch=a.max_batch, max_seq=a.max_seq,
                                page_size=a.page_size, target=a.target, layout=a.layout, calib_file=a.calib_file,
                                calib_text=a.calib_text, calib_dataset=a.calib_dataset, calib_samples=a.calib_samples,
                                calib_seq_len=a.calib_seq_len, quantize_head=a.quantize_head, tp=a.tp,
                                overwrite=a.overwrite,
                                progress=not a.no_progress)
            manifest = build(opts)
            print("\n".join(memory_budget(opts.model, opts, a.gpu_gb)), file=sys.stderr)
    except (BuildError, EngineDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {"engine_dir": str(a.from_onnx or a.out), "stage": manifest["stage"],
               "recipe": manifest["recipe"]["name"], "engine_kinds": list(manifest["engine_kinds"]),
               "tp": manifest.get("tensor_parallel", {}).get("size", 1),
               "seconds": manifest.get("seconds")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The engine build: checkpoint -> (quantized checkpoint) -> ONNX graphs -> (TensorRT engines) -> manifest.

Everything is written into a temporary sibling of the output directory (``.<name>.partial-<pid>``); the
manifest is written last and the directory is then renamed into place, so a build killed at any point
(SIGKILL included) leaves nothing at ``--out`` that the runtime accepts. A build that fails (an error, an
interrupt, SIGTERM through ``scripts/build_engine.py``) removes its temporary directory and the parent folders
it created; only SIGKILL leaves the temporary directory, which the next build next to it removes. An ``--out``
that overlaps ``--model`` (equal, or one inside the other) is refused before anything is written.
``--from-onnx DIR`` adds the TensorRT engines to a finished ONNX-stage directory on a GPU host: engines go to
``trt.partial-<pid>/``, are renamed to ``trt/``, and the manifest is replaced atomically last.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from trimode import __version__
from trimode.build.onnx_export import GRAPH_VERSION, export_graphs, rank_dir_name
from trimode.build.plugin_ops import PLUGIN_NAMESPACE
from trimode.build.recipes import RECIPES, get_recipe
from trimode.build.targets import TARGETS, TargetError, get_target
from trimode.build.trt_compile import LAYOUTS, EngineBuildError, build_engines, tensorrt_status
from trimode.runtime.executors.engine_dir import (FORMAT, FORMAT_VERSION, MANIFEST, EngineDirError, check_engine_dir,
                                                  checkpoint_hash, current_plugin_versions, file_entries,
                                                  read_manifest, write_manifest)
from trimode.runtime.executors.engine_kinds import ENGINE_KINDS, MODE_KINDS, ModeError, kinds_for_modes
from trimode.runtime.model.checkpoint import CheckpointError, load_config
from trimode.runtime.parallel.comm import TensorParallelConfigError
from trimode.runtime.parallel.sharding import check_tensor_parallel
from trimode.runtime.settings import DEFAULTS

TOOLS = ("torch", "onnx", "onnxruntime", "onnxruntime-extensions", "nvidia-modelopt", "transformers", "tensorrt",
         "triton", "safetensors", "tokenizers")


class BuildError(RuntimeError):
    """A build that cannot proceed; the message is one line saying why and what to do."""


@dataclass(frozen=True)
class BuildOptions:
    model: Path
    out: Path
    recipe: str | None = None  # None: the target's default_recipe (w4a16 for --target spark, else none)
    modes: tuple[str, ...] = ("ar", "diffusion", "spec")
    block_length: int = 32
    max_batch: int = 8
    max_seq: int = 4096
    page_size: int = DEFAULTS.page_size
    target: str = "hopper"
    layout: str = "shared"
    calib_file: Path | None = None
    calib_text: str | None = None
    calib_dataset: str | None = None  # a Hugging Face dataset NAME[:CONFIG] (needs `datasets` and its hub)
    calib_samples: int = 32
    calib_seq_len: int = 256
    quantize_head: bool = False
    tp: int = 1  # tensor-parallel ranks: one graph set (and engine) per rank
    overwrite: bool = False  # replace an engine directory holding a different build (only once the new one is done)
    progress: bool = True
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("block_length", "max_batch", "max_seq", "page_size", "calib_samples", "calib_seq_len", "tp"):
            if int(getattr(self, name)) < 1:
                raise BuildError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        try:
            target = get_target(self.target)
        except TargetError as e:
            raise BuildError(str(e)) from None
        if self.layout not in LAYOUTS:
            raise BuildError(f"unknown TensorRT layout {self.layout!r}; choose from: {', '.join(LAYOUTS)}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise BuildError(f"unknown recipe {self.recipe!r} (--quant); choose from: {', '.join(RECIPES)}")
        try:
            target.check(self.recipe, self.tp)
        except TargetError as e:
            raise BuildError(str(e)) from None
        try:
            kinds_for_modes(self.modes)
        except ModeError as e:
            raise BuildError(f"--modes: {e}") from None

    @property
    def recipe_name(self) -> str:
        return self.recipe or TARGETS[self.target].default_recipe


def tool_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "trimode": __version__}
    for name in TOOLS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def check_model_dir(model: Path) -> None:
    """One-line errors for a wrong --model: missing, not a checkpoint, not an NLD checkpoint."""
    if not model.exists():
        raise BuildError(f"--model {model}: no such directory")
    if not model.is_dir():
        raise BuildError(f"--model {model}: not a directory (pass the checkpoint folder holding config.json)")
    if not (model / "config.json").is_file():
        raise BuildError(f"--model {model}: no config.json here; not a Hugging Face checkpoint directory")
    try:
        load_config(model)
    except CheckpointError as e:
        raise BuildError(f"--model {model}: not an NLD checkpoint: {e}") from None
    if not any(model.glob("*.safetensors")):
        raise BuildError(f"--model {model}: no *.safetensors weights")


def check_out_dir(model: Path, out: Path) -> None:
    """One-line error for an ``--out`` that overlaps ``--model``: the same directory, inside it (the checkpoint
    copy would hold the engine directory being written) or holding it (replacing --out would delete the model).
    Symbolic links are resolved first."""
    m, o = model.resolve(), out.resolve()
    if o == m:
        raise BuildError(f"--out {out} is the --model directory; the engine directory must be a new directory "
                         f"outside the checkpoint, e.g. --out {model.parent / (model.name + '-engine')}")
    if o.is_relative_to(m):
        raise BuildError(f"--out {out} is inside --model {model} (the build copies the checkpoint into the engine "
                         f"directory); choose an --out outside it, e.g. {model.parent / (model.name + '-engine')}")
    if m.is_relative_to(o):
        raise BuildError(f"--model {model} is inside --out {out}, which the build would replace; choose an --out "
                         f"that does not contain the checkpoint")


def build_key(opts: BuildOptions, model_hash: str) -> dict[str, Any]:
    """What makes two builds the same build (an existing --out with the same key is up to date)."""
    calibration = [opts.calib_file.name if opts.calib_file else None, opts.calib_text, opts.calib_samples,
                   opts.calib_seq_len, opts.quantize_head] + ([opts.calib_dataset] if opts.calib_dataset else [])
    return {"model_hash": model_hash, "recipe": opts.recipe_name, "modes": sorted(opts.modes),
            "block_length": opts.block_length, "max_batch": opts.max_batch, "max_seq": opts.max_seq,
            "page_size": opts.page_size, "target": opts.target, "layout": opts.layout,
            "calibration": calibration if get_recipe(opts.recipe_name).quantizes else None,
            "graph_version": GRAPH_VERSION,  # graphs written by other code are rebuilt
            **({"tp": opts.tp} if opts.tp > 1 else {})}  # (absent at tp 1: builds before --tp stay valid)


def _make_parents(directory: Path) -> list[Path]:
    """``mkdir -p directory``; returns the folders it created, outermost first (removed again on failure)."""
    missing = [p for p in [directory, *directory.parents] if not p.exists()][::-1]
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_created(tmp: Path, created: list[Path]) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # something else was put there meanwhile: keep it
            break


def _remove_stale_partials(out: Path) -> None:
    for tmp in [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.replaced-*")]:
        pid = tmp.name.rsplit("-", 1)[-1]
        alive = pid.isdigit() and _pid_alive(int(pid))
        if not alive:
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build(opts: BuildOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the build; returns the manifest. Raises ``BuildError`` (one line) for bad inputs, before anything is
    written; a build that fails later removes everything it wrote (module docstring)."""
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_model_dir(opts.model)
    check_out_dir(opts.model, opts.out)
    try:
        check_tensor_parallel(load_config(opts.model), opts.tp)
    except TensorParallelConfigError as e:
        raise BuildError(f"--tp: {e}") from None
    recipe = get_recipe(opts.recipe_name)
    if recipe.quantizes:
        from trimode.build.calibration import CalibrationError, check_calibration_source

        try:
            check_calibration_source(opts.calib_file, opts.calib_text, opts.calib_dataset)
        except CalibrationError as e:
            raise BuildError(str(e)) from None
    t0 = time.perf_counter()
    say(f"[1/5] hashing {opts.model.name}/")
    model_hash = checkpoint_hash(opts.model)
    key = build_key(opts, model_hash)
    if opts.out.exists():
        try:
            existing = read_manifest(opts.out)
        except EngineDirError:
            if not opts.out.is_dir() or any(opts.out.iterdir()):
                raise BuildError(f"--out {opts.out} exists and is not an engine directory (no valid manifest.json); "
                                 f"refusing to overwrite it") from None
        else:
            if existing.get("build_key") == key:
                say(f"{opts.out} is up to date (same model, recipe and settings): nothing to do")
                return existing
            diff = [k for k in key if existing.get("build_key", {}).get(k) != key[k]]
            if not opts.overwrite:
                raise BuildError(f"--out {opts.out} holds a different build (differs in: {', '.join(diff)}); choose "
                                 f"another --out, delete it, or pass --overwrite")
            say(f"{opts.out} holds a different build (differs in: {', '.join(diff)}): replacing it once the new "
                f"one is complete (--overwrite)")
    created = _make_parents(opts.out.parent)
    _remove_stale_partials(opts.out)
    tmp = opts.out.parent / f".{opts.out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir()
        manifest = _build_into(tmp, opts, recipe, model_hash, key, say)
        manifest["seconds"]["total"] = round(time.perf_counter() - t0, 2)
        manifest["files"] = file_entries(tmp)
        write_manifest(tmp, manifest)
        _move_into_place(tmp, opts.out)
    except BaseException:
        _remove_created(tmp, created)
        raise
    if manifest["tensorrt"] is None:
        where = ("once TensorRT-RTX is installed (any machine)" if TARGETS[opts.target].flavour == "tensorrt-rtx"
                 else "on a GPU host with TensorRT 11")
        say(f"ONNX stage complete in {opts.out}. TensorRT could not run here ({tensorrt_status(opts.target)[1]}). "
            f"To finish {where}: python scripts/build_engine.py --from-onnx {opts.out}")
    return manifest


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` (an empty folder, or a different build under
    --overwrite) stays valid until this point and comes back if the rename fails."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _build_into(tmp: Path, opts: BuildOptions, recipe: Any, model_hash: str, key: dict[str, Any],
                say: Callable[[str], None]) -> dict[str, Any]:
    """Stages 2-4 into the temporary directory ``tmp``; returns the manifest (without ``files``)."""
    kinds = kinds_for_modes(opts.modes)
    seconds: dict[str, float] = {}
    quant_summary: dict[str, Any] | None = None
    t = time.perf_counter()
    if recipe.quantizes:
        say(f"[2/5] quantizing with recipe {recipe.name} (ModelOpt, in a child process)")
        from trimode.build.quantize import run_in_subprocess

        try:
            quant_summary = run_in_subprocess(opts.model, recipe.name, tmp / "checkpoint", opts.calib_file,
                                              opts.calib_text, opts.calib_samples, opts.calib_seq_len,
                                              opts.quantize_head, opts.progress, opts.calib_dataset)
        except RuntimeError as e:
            raise BuildError(str(e)) from None
    else:
        say("[2/5] recipe none: copying the checkpoint")
        shutil.copytree(opts.model, tmp / "checkpoint")
    seconds["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    say(f"[3/5] exporting ONNX graphs: {', '.join(kinds)} (+ unified), plugin and reference forms"
        + (f", one set per rank of {opts.tp}" if opts.tp > 1 else ""))
    try:
        files = export_graphs(tmp / "checkpoint", tmp / "onnx", kinds, opts.page_size, say, tp=opts.tp)
    except TensorParallelConfigError as e:  # e.g. int4 groups cut by the split
        raise BuildError(f"--tp: {e}") from None
    seconds["onnx"] = time.perf_counter() - t
    cfg = load_config(tmp / "checkpoint")
    shapes = {"max_batch": opts.max_batch, "max_seq": opts.max_seq, "block_length": opts.block_length,
              "page_size": opts.page_size, "max_pages_total": opts.max_batch * -(-opts.max_seq // opts.page_size),
              "num_layers": cfg.num_hidden_layers, "num_kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
              "num_kv_heads_per_rank": cfg.num_key_value_heads // opts.tp}
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "stage": "onnx",
        "model": {"name": opts.model.name, "content_hash": model_hash, "architecture": "NemotronLabsDiffusionModel",
                  "config": cfg.to_dict()},
        "recipe": {"name": recipe.name, "description": recipe.description, "weights": recipe.weights,
                   "activations": recipe.activations, "kv_cache": recipe.kv_cache, "group_size": recipe.group_size,
                   "quantize_head": opts.quantize_head, "modelopt": quant_summary},
        "modes": sorted(opts.modes), "target": opts.target,
        "engine_kinds": {k: {"plugin": files[k]["plugin"], "reference": files[k]["reference"],
                             "is_causal": ENGINE_KINDS[k].is_causal, "keeps_kv": ENGINE_KINDS[k].keeps_kv,
                             "lora": ENGINE_KINDS[k].has_lora,
                             "pass_kinds": [p.value for p in ENGINE_KINDS[k].pass_kinds]} for k in kinds},
        "unified_graph": files["unified"]["plugin"],
        "tensor_parallel": tensor_parallel_section(opts.tp),
        "shapes": shapes,
        "kv_cache": {"layout": "[num_layers, num_pages, page_size, num_kv_heads, head_dim]", "dtype": "float32",
                     "quantization": recipe.kv_cache},
        "plugins": {"namespace": PLUGIN_NAMESPACE, "versions": current_plugin_versions(), "onnx_domain": PLUGIN_NAMESPACE,
                    "reference_form": "standard ONNX ops"},
        "tools": tool_versions(), "tensorrt": None, "build_key": key,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    usable, reason = tensorrt_status(opts.target)
    if usable:
        say("[4/5] TensorRT: compiling engines")
        t = time.perf_counter()
        manifest["tensorrt"] = _compile(tmp, manifest, opts.layout)
        manifest["stage"] = "tensorrt"
        manifest["seconds"]["tensorrt"] = round(time.perf_counter() - t, 2)
    else:
        say(f"[4/5] TensorRT stage skipped: {reason}")
    say("[5/5] writing manifest.json (content hashes) and moving the directory into place")
    return manifest


def _compile(root: Path, manifest: dict[str, Any], layout: str) -> dict[str, Any]:
    if TARGETS[manifest["target"]].flavour == "tensorrt-rtx":  # built ahead of time, no GPU involved
        return _build_all_ranks(root, root / "trt", manifest, layout)
    import torch

    arch = "sm_{}{}".format(*torch.cuda.get_device_capability())
    if TARGETS[manifest["target"]].arch != arch:
        print(f"warning: --target {manifest['target']} is {TARGETS[manifest['target']].arch} but this GPU is {arch}; "
              f"TensorRT engines run only on the GPU architecture they were built on", file=sys.stderr)
    return _build_all_ranks(root, root / "trt", manifest, layout)


def _build_all_ranks(root: Path, trt_dir: Path, manifest: dict[str, Any], layout: str) -> dict[str, Any]:
    """One engine set per rank's graph set (``trt/`` at tp 1, ``trt/rank<r>/`` under --tp)."""
    shapes, section = manifest["shapes"], manifest.get("tensor_parallel", tensor_parallel_section(1))
    target = {"target": manifest["target"], "recipe": manifest["recipe"]["name"]}  # flavour, compute capabilities
    try:
        if section["size"] == 1:
            return build_engines(root / "onnx", trt_dir, list(manifest["engine_kinds"]), shapes,
                                 shapes["num_layers"], layout, **target)
        ranks = []
        for graphs in section["graph_dirs"]:
            sub = Path(graphs).name
            ranks.append(build_engines(root / graphs, trt_dir / sub, list(manifest["engine_kinds"]), shapes,
                                       shapes["num_layers"], layout, plan_prefix=f"trt/{sub}/",
                                       num_ranks=section["size"], **target))
    except EngineBuildError as e:
        raise BuildError(str(e)) from None
    return {"layout": layout, "flavour": ranks[0]["flavour"], "version": ranks[0]["version"],
            "compute_capabilities": ranks[0]["compute_capabilities"], "ranks": ranks}


def tensor_parallel_section(tp: int) -> dict[str, Any]:
    """The manifest's ``tensor_parallel`` section: the size and each rank's graph directory."""
    if tp == 1:
        return {"size": 1, "graph_dirs": ["onnx"]}
    return {"size": tp, "graph_dirs": [f"onnx/{rank_dir_name(r)}" for r in range(tp)],
            "split": "q/k/v/gate/up by output rows, o/down by input columns (all-reduce after each), embedding "
                     "and diffusion_head by vocabulary rows (embedding all-reduced), drafter lora_A by columns",
            "logits": "each rank's graphs return their vocabulary slice; the runtime gathers them on rank 0",
            "kv_cache": "each rank's pool holds num_kv_heads_per_rank heads of the same pages"}


def finish_from_onnx(engine_dir: Path, layout: str = "shared", log: Callable[[str], None] | None = None
                     ) -> dict[str, Any]:
    """The TensorRT stage for a finished ONNX-stage engine directory (on a GPU host)."""
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    manifest = check_engine_dir(engine_dir)
    usable, reason = tensorrt_status(manifest["target"])
    if not usable:
        raise BuildError(f"--from-onnx {engine_dir}: TensorRT cannot run here: {reason}")
    tmp = engine_dir / f"trt.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"TensorRT: compiling {', '.join(manifest['engine_kinds'])} ({layout} layout)")
    try:
        section = _build_all_ranks(engine_dir, tmp, manifest, layout)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed TensorRT stage leaves the ONNX-stage directory as it was
        raise
    final = engine_dir / "trt"
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    manifest.update(stage="tensorrt", tensorrt=section, tools=tool_versions())
    manifest["files"] = file_entries(engine_dir)
    write_manifest(engine_dir, manifest)  # last: until here the old (ONNX-stage) manifest stays valid
    return manifest


def options_dict(opts: BuildOptions) -> dict[str, Any]:
    d = asdict(opts)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


__all__ = ["BuildError", "BuildOptions", "build", "finish_from_onnx", "MANIFEST", "MODE_KINDS"]

"""Engine directories: the manifest a build writes last, and the check the runtime makes first.

An engine directory (``build_engine.py --out DIR``) holds ``manifest.json``, ``checkpoint/`` (the checkpoint the
engines were built from: config, tokenizer, LoRA, quantized weights), ``onnx/`` (graphs + shared weights) and,
after the TensorRT stage, ``trt/``. The manifest names the model (content hash), the recipe, the modes and
engine kinds, the shapes, the page size and block length, the plugin versions, the version of every tool and
the size and SHA-256 of every file. A build writes everything into a temporary sibling directory, writes the
manifest last, and renames the directory into place, so an interrupted build leaves nothing with a manifest
at ``DIR``: a directory without a valid manifest is refused.

``check_engine_dir`` refuses, with a message naming the field, a directory whose manifest does not match what
the caller runs with (model hash, page size, block length, plugin versions) or whose files do not match their
recorded sizes / hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from trimode.plugins import PLUGIN_VERSIONS

MANIFEST = "manifest.json"
FORMAT = "trimode-engine"
FORMAT_VERSION = 1
HASH_LIMIT = 256 << 20  # files above this are checked by size unless verify_hashes="all"


class EngineDirError(ValueError):
    """An engine directory the runtime refuses, with the reason."""


class EngineMismatch(EngineDirError):
    """An engine directory built for something else than what the runtime asks for; ``field`` names it."""

    def __init__(self, field: str, built: Any, wanted: Any, where: Path) -> None:
        self.field, self.built, self.wanted = field, built, wanted
        super().__init__(f"engine directory {where} does not match: {field} is {built!r} in its manifest, "
                         f"the runtime asks for {wanted!r}; rebuild it (scripts/build_engine.py) or run with "
                         f"the settings it was built for")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path, skip: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file under ``root`` (sorted, POSIX separators)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in skip:
            continue
        out[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def checkpoint_hash(path: str | Path) -> str:
    """Content hash of a checkpoint directory: SHA-256 over the sorted (relative name, file SHA-256) pairs of its
    files (config, weights, tokenizer, LoRA), so copies and moves of the same checkpoint hash the same."""
    root = Path(path)
    h = hashlib.sha256()
    for rel, entry in file_entries(root, skip=()).items():
        h.update(f"{rel}\0{entry['sha256']}\n".encode())
    return h.hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (temporary file, fsync, rename)."""
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise EngineDirError(f"{directory} is not a directory")
    if not path.is_file():
        raise EngineDirError(f"{directory} has no {MANIFEST}: not a finished engine build (an interrupted build "
                             f"leaves none); build it with scripts/build_engine.py")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineDirError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise EngineDirError(f"{path} is not a trimode engine manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise EngineMismatch("format_version", manifest.get("format_version"), FORMAT_VERSION, directory)
    return manifest


def check_engine_dir(directory: str | Path, *, model_hash: str | None = None, page_size: int | None = None,
                     block_length: int | None = None, plugin_versions: dict[str, str] | None = None,
                     verify_hashes: bool | str = True) -> dict[str, Any]:
    """The manifest of ``directory`` after checking it against the caller's settings and its files.

    ``verify_hashes``: True hashes files up to 256 MiB (larger ones are checked by size), "all" hashes every
    file, False checks sizes only.
    """
    directory = Path(directory)
    m = read_manifest(directory)
    wanted = {"model.content_hash": model_hash, "shapes.page_size": page_size, "shapes.block_length": block_length}
    for field, value in wanted.items():
        if value is None:
            continue
        section, key = field.split(".")
        if m.get(section, {}).get(key) != value:
            raise EngineMismatch(field, m.get(section, {}).get(key), value, directory)
    if plugin_versions is None:
        plugin_versions = current_plugin_versions()
    built_plugins = m.get("plugins", {}).get("versions", {})
    for op, version in plugin_versions.items():
        if op in built_plugins and built_plugins[op] != version:
            raise EngineMismatch(f"plugins.versions.{op}", built_plugins[op], version, directory)
    for rel, entry in m.get("files", {}).items():
        path = directory / rel
        if not path.is_file():
            raise EngineDirError(f"engine directory {directory}: {rel} is listed in the manifest but missing")
        if path.stat().st_size != entry["bytes"]:
            raise EngineDirError(f"engine directory {directory}: {rel} has {path.stat().st_size} bytes, the manifest "
                                 f"says {entry['bytes']} (modified after the build?)")
        if verify_hashes == "all" or (verify_hashes and entry["bytes"] <= HASH_LIMIT):
            if sha256_file(path) != entry["sha256"]:
                raise EngineDirError(f"engine directory {directory}: {rel} does not match its SHA-256 in the "
                                     f"manifest (modified after the build?)")
    return m


def current_plugin_versions() -> dict[str, str]:
    """The plugin versions this runtime implements (``trimode.plugins.PLUGIN_VERSIONS``): what an engine's
    graphs must carry."""
    return dict(PLUGIN_VERSIONS)


def tensor_parallel_size(manifest: dict[str, Any]) -> int:
    """The number of ranks an engine directory was built for (``build_engine.py --tp``; 1 for older builds)."""
    return int(manifest.get("tensor_parallel", {}).get("size", 1))


def graph_dir(manifest: dict[str, Any], rank: int = 0) -> str:
    """The directory (relative to the engine directory) holding rank ``rank``'s ONNX graphs."""
    dirs = manifest.get("tensor_parallel", {}).get("graph_dirs", ["onnx"])
    return dirs[rank]


def engine_checkpoint(directory: str | Path) -> Path:
    return Path(directory) / "checkpoint"


def _placeholder_model(checkpoint: Path, tp: int = 1):
    """An ``NLDModel`` of the checkpoint's config whose tensors are allocated but never written or read: what
    ``TriModeLM`` needs (config, dtype, device, the KV heads this rank holds) when an engine executor
    computes (untouched pages stay non-resident)."""
    from trimode.runtime.model.checkpoint import load_config
    from trimode.runtime.model.network import NLDModel, on_meta_device

    with on_meta_device():
        model = NLDModel(load_config(checkpoint))
    for layer in model.encoder.layers:
        layer.self_attn.hkv //= tp  # the pool holds this rank's share of the KV heads
    return model.to_empty(device="cpu").float().eval()


def open_engine(directory: str | Path, executor: str = "onnxruntime", num_pages: int = 512,
                page_size: int | None = None, max_batch_size: int = 64, **executor_kwargs):
    """A ``TriModeLM`` over an engine directory: the manifest is checked first (a mismatch is refused), then
    ``executor`` runs it: "onnxruntime" (the reference-form graphs), or "torch" (the engine's checkpoint,
    dequantized if quantized: the baseline the engines are compared with)."""
    from trimode.runtime.api import TriModeLM
    from trimode.runtime.model.checkpoint import load_tokenizer

    directory = Path(directory)
    manifest = check_engine_dir(directory, page_size=page_size)
    if tensor_parallel_size(manifest) != 1:
        raise EngineMismatch("tensor_parallel.size", tensor_parallel_size(manifest), 1, directory)
    page_size = manifest["shapes"]["page_size"]
    ckpt = engine_checkpoint(directory)
    if executor == "torch":
        model = load_engine_model(ckpt)
        factory = "torch"
    elif executor == "onnxruntime":
        from trimode.runtime.executors.onnx_executor import OnnxRuntimeExecutor

        model = _placeholder_model(ckpt)

        def factory(model, cache):  # noqa: ANN001
            return OnnxRuntimeExecutor(directory, cache, check=False, **executor_kwargs)
    else:
        raise ValueError(f"executor {executor!r} cannot run an engine directory; use 'onnxruntime' or 'torch'")
    lm = TriModeLM(model, load_tokenizer(ckpt, model.config), num_pages=num_pages, page_size=page_size,
                   max_batch_size=max_batch_size, executor=factory)
    lm.engine_manifest = manifest
    return lm


def open_engine_tensor_parallel(directory: str | Path, comm, num_pages: int = 512, page_size: int | None = None,
                                max_batch_size: int = 64, **executor_kwargs):
    """This rank's part of a ``--tp N`` engine directory, run by the onnxruntime executor on its graph set.
    Rank 0 gets a ``TriModeLM`` (close it with ``lm.executor.close()``), the other ranks a
    ``TensorParallelWorker`` (call ``serve()``), as ``tensor_parallel.load_tensor_parallel``."""
    from trimode.runtime.executors.onnx_executor import OnnxRuntimeExecutor
    from trimode.runtime.parallel.sharding import rank_runtime

    directory = Path(directory)
    manifest = check_engine_dir(directory, page_size=page_size)
    tp = tensor_parallel_size(manifest)
    if tp != comm.world_size:
        raise EngineMismatch("tensor_parallel.size", tp, comm.world_size, directory)
    ckpt = engine_checkpoint(directory)
    loaded = rank_runtime(_placeholder_model(ckpt, tp), comm,
                          lambda model, cache: OnnxRuntimeExecutor(directory, cache, check=False, comm=comm,
                                                                   **executor_kwargs),
                          ckpt, num_pages, manifest["shapes"]["page_size"], max_batch_size)
    if comm.is_leader:
        loaded.engine_manifest = manifest
    return loaded


def load_engine_model(checkpoint: Path):
    """The torch model of an engine's checkpoint (quantized checkpoints dequantized, FP8 inputs simulated)."""
    from trimode.runtime.model.checkpoint import load_model

    if (Path(checkpoint) / "hf_quant_config.json").is_file():
        from trimode.runtime.model.quantized import load_quantized_model

        return load_quantized_model(checkpoint)
    return load_model(checkpoint)

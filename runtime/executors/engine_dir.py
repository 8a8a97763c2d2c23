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
recorded sizes / hashes. ``engine_limits`` reads what the engines were built to hold (batch, sequence length,
pages, tokens per forward of each engine kind, modes): the runtime sizes itself and admits requests by them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trimode.plugins import PLUGIN_VERSIONS
from trimode.plugins.tensorrt_libs import same_release
from trimode.runtime.executors.engine_kinds import MODE_KINDS, token_range

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


@dataclass(frozen=True)
class EngineLimits:
    """What an engine directory's engines were built to hold (its manifest's ``shapes``, ``modes`` and
    ``engine_kinds``): at most ``max_batch`` sequences per forward, ``max_seq`` positions per sequence,
    ``max_pages`` pages of ``page_size`` tokens in the pool, and ``max_tokens[kind]`` new tokens in one forward
    of each engine kind (the maximum of its TensorRT optimization profile, ``engine_kinds.token_range``);
    ``block_length`` is the block the profiles are tuned for (the default block of requests), ``modes`` the
    modes whose engine kinds were built. ``source`` names the directory in messages."""

    source: str
    modes: tuple[str, ...]
    max_batch: int
    max_seq: int
    block_length: int
    page_size: int
    max_pages: int
    max_tokens: dict[str, int]


def engine_limits(manifest: dict[str, Any], directory: str | Path) -> EngineLimits:
    """The build-time limits of an engine directory, from its (checked) manifest. Raises ``EngineDirError``
    naming a missing ``shapes`` field."""
    shapes = manifest.get("shapes", {})
    missing = [k for k in ("max_batch", "max_seq", "block_length", "page_size") if not isinstance(shapes.get(k), int)]
    if missing:
        raise EngineDirError(f"engine directory {directory}: manifest shapes lack {missing}")
    b, s, blk = shapes["max_batch"], shapes["max_seq"], shapes["block_length"]
    pages = int(shapes.get("max_pages_total") or b * -(-s // shapes["page_size"]))
    kinds = list(manifest.get("engine_kinds", {})) or list(dict.fromkeys(k for m in MODE_KINDS.values() for k in m))
    return EngineLimits(str(directory), tuple(manifest.get("modes", MODE_KINDS)), b, s, blk, shapes["page_size"],
                        pages, {k: token_range(k, b, s, blk)[2] for k in kinds})


def check_tensorrt(manifest: dict[str, Any], directory: str | Path, *, flavour: str, version: str | None,
                   compute_capability: str | None = None) -> dict[str, Any]:
    """The manifest's ``tensorrt`` section, after checking it against the TensorRT that is to load its plans:
    ``flavour`` ("tensorrt" = TensorRT 11, or "tensorrt-rtx"), its ``version`` (plans load only in the release
    that built them: major.minor.patch must match) and the GPU's ``compute_capability`` ("SM121"; None: not
    checked), which must be one of the section's ``compute_capabilities``. Raises ``EngineMismatch`` naming the
    field, what the engines were built for and what is running; ``EngineDirError`` if there are no engines."""
    section = manifest.get("tensorrt")
    if not section:
        raise EngineDirError(f"engine directory {directory} has no TensorRT engines (stage {manifest.get('stage')!r})")
    built = section.get("flavour", "tensorrt")  # builds before TensorRT-RTX were TensorRT 11's
    if built != flavour:
        raise EngineMismatch("tensorrt.flavour", built, flavour, Path(directory))
    if version is not None and not same_release(str(section.get("version", "")), str(version)):
        raise EngineMismatch("tensorrt.version", section.get("version"), version, Path(directory))
    targets = section.get("compute_capabilities")
    if compute_capability is not None and targets is not None and compute_capability not in targets:
        raise EngineMismatch("tensorrt.compute_capabilities", targets, compute_capability, Path(directory))
    return section

"""The ONNX stage of a build: every engine kind's graph in both forms, all sharing one weights file.

Writes into ``<engine dir>/onnx/``:

- ``<kind>.plugin.onnx`` for each kind (TensorRT input; plugin nodes), ``unified.plugin.onnx`` (all kinds in
  one graph, for the one-engine TensorRT layout), ``<kind>.reference.onnx`` (onnxruntime on CPU);
- ``weights.bin``: every initializer larger than 1 KiB, once, as ONNX external data that all graphs reference
  (same name, same bytes, same offset), so the weights exist once on disk whatever the number of graphs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import onnx
from onnx import external_data_helper

from trimode.build.onnx_graph import GRAPH_VERSION, ModelWeights, build_graph  # GRAPH_VERSION: re-exported
from trimode.build.sharding import shard_weights
from trimode.runtime.executors.engine_kinds import ENGINE_KINDS
from trimode.runtime.model.hf_format import LORA_DIR, load_config, load_lora, read_safetensors, weight_files
from trimode.runtime.model.quantized import is_quantized_checkpoint, read_quantized_checkpoint

WEIGHTS_FILE = "weights.bin"
EXTERNAL_MIN_BYTES = 1024
ALIGN = 4096  # page-aligned offsets: onnxruntime can memory-map them


def load_weights(checkpoint: str | Path) -> ModelWeights:
    """The tensors of a checkpoint as stored (quantized ones stay packed), its LoRA and KV scales."""
    checkpoint = Path(checkpoint)
    if is_quantized_checkpoint(checkpoint):
        cfg, _, tensors = read_quantized_checkpoint(checkpoint)
    else:
        cfg, tensors = load_config(checkpoint), read_safetensors(weight_files(checkpoint))
    kv_scales = {k: float(v) for k, v in tensors.items() if k.endswith((".k_scale", ".v_scale"))}
    lora, scale = None, 1.0
    if (checkpoint / LORA_DIR).is_dir():
        adapter = load_lora(checkpoint / LORA_DIR, cfg)
        lora = [(a.detach(), b.detach()) for a, b in zip(adapter.lora_A, adapter.lora_B)]
        scale = adapter.scale
    return ModelWeights(cfg, tensors, lora, scale, kv_scales)


class SharedWeightsFile:
    """Moves initializers into one external-data file, writing each distinct initializer once."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / WEIGHTS_FILE
        self.entries: dict[str, tuple[int, int]] = {}
        self._file = open(self.path, "wb")
        self._size = 0

    def externalize(self, model: onnx.ModelProto) -> None:
        for tensor in model.graph.initializer:
            data = tensor.raw_data
            if len(data) < EXTERNAL_MIN_BYTES:
                continue
            if tensor.name not in self.entries:
                pad = -self._size % ALIGN
                self._file.write(b"\0" * pad)
                self.entries[tensor.name] = (self._size + pad, len(data))
                self._file.write(data)
                self._size += pad + len(data)
            offset, length = self.entries[tensor.name]
            assert length == len(data), f"initializer {tensor.name} differs between graphs"
            external_data_helper.set_external_data(tensor, WEIGHTS_FILE, offset, length)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")

    def close(self) -> None:
        self._file.flush()
        self._file.close()


def graph_files(kinds: list[str]) -> dict[str, dict[str, str]]:
    """File names per kind: {"prefill": {"plugin": "prefill.plugin.onnx", "reference": ...}, ...}."""
    files = {k: {"plugin": f"{k}.plugin.onnx", "reference": f"{k}.reference.onnx"} for k in kinds}
    files["unified"] = {"plugin": "unified.plugin.onnx"}
    return files


def rank_dir_name(rank: int) -> str:
    """The sub-directory of ``onnx/`` holding rank ``rank``'s graph set in a ``--tp N`` build."""
    return f"rank{rank}"


def export_graphs(checkpoint: str | Path, out_dir: str | Path, kinds: list[str], page_size: int,
                  progress: Callable[[str], None] | None = None, tp: int = 1) -> dict[str, dict[str, str]]:
    """Write every graph of ``kinds`` (plus the unified graph) into ``out_dir``; returns ``graph_files``.

    With ``tp`` > 1 each rank's shard (build/sharding.py) gets its own graph set and weights file in
    ``out_dir/rank<r>/`` (same file names in every rank directory)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    assert all(k in ENGINE_KINDS for k in kinds), kinds
    weights = load_weights(checkpoint)
    if tp == 1:
        return _export_set(weights, out_dir, kinds, page_size, say, "")
    shards = [shard_weights(weights, rank, tp) for rank in range(tp)]  # checks every rank can be cut first
    for rank, shard in enumerate(shards):
        files = _export_set(shard, out_dir / rank_dir_name(rank), kinds, page_size, say, f"rank {rank}/{tp} ")
    return files


def _export_set(weights: ModelWeights, out_dir: Path, kinds: list[str], page_size: int,
                say: Callable[[str], None], label: str) -> dict[str, dict[str, str]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = graph_files(kinds)
    store = SharedWeightsFile(out_dir)
    jobs = [(k, form) for k in kinds for form in ("plugin", "reference")] + [("unified", "plugin")]
    try:
        for n, (kind, form) in enumerate(jobs, 1):
            model = build_graph(weights, kind, form, page_size)
            store.externalize(model)
            onnx.save(model, str(out_dir / files[kind][form]))
            say(f"onnx {label}[{n}/{len(jobs)}] {files[kind][form]}: {len(model.graph.node)} nodes")
    finally:
        store.close()
    return files

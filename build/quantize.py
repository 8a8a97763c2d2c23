"""Quantize an NLD checkpoint with ModelOpt and export it as a unified Hugging Face checkpoint.

    python -m trimode.build.quantize --model DIR --recipe fp8 --out DIR [--calib-file F | --calib-text T |
        --calib-dataset NAME[:CONFIG]]      # default: the checkpoint's calibration.txt, else trimode's KJV text

The output keeps the NLD layout (``config.json`` + ``model.safetensors`` with ``encoder.*`` and
``diffusion_head`` names, ``tokenizer.json``, ``linear_spec_lora/`` unchanged) and adds ModelOpt's
``hf_quant_config.json`` and the ``quantization_config`` block of ``config.json``: FP8 weights are
``float8_e4m3fn`` with ``weight_scale`` / ``input_scale``; INT4 AWQ weights are packed two per ``uint8`` with
per-group ``weight_scale`` and ``pre_quant_scale`` (or that scale folded into the preceding RMSNorm).

ModelOpt facts this module is shaped by (../shared/spec/stack.md §3): export works on CPU from a **bf16**
model only, and only once per process, so a build runs this module in a child process
(``run_in_subprocess``); ``export_hf_checkpoint`` needs ``config.architectures`` and an HF-like
``save_pretrained``, which ``_HFExportView`` provides over the unchanged NLD modules. The last stdout line is
a JSON summary for the parent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from trimode.build.calibration import (CalibrationError, calibration_set, make_forward_loop,
                                       resolve_calibration_text)
from trimode.build.recipes import Recipe, RecipeError, get_recipe, modelopt_config
from trimode.runtime.model.checkpoint import INDEX_FILE, LORA_DIR, SINGLE_FILE, CheckpointError, load_model, load_tokenizer
from trimode.runtime.model.network import NLDModel, causal_mask
from trimode.runtime.model.network import Attention

QUANT_CONFIG_FILE = "hf_quant_config.json"


class _HFConfig(SimpleNamespace):
    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _HFExportView(nn.Module):
    """What ``export_hf_checkpoint`` needs from a transformers model, over the NLD modules themselves (so tensor
    names stay ``encoder.*`` / ``diffusion_head.*``; the LoRA adapter is not part of the view)."""

    def __init__(self, model: NLDModel) -> None:
        super().__init__()
        self.encoder, self.diffusion_head = model.encoder, model.diffusion_head
        object.__setattr__(self, "nld", model)  # not a submodule: its LoRA stays out of the state dict
        self.config = _HFConfig(**model.config.replace(torch_dtype="bfloat16").to_dict())

    @property
    def device(self) -> torch.device:
        return self.diffusion_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16

    def forward(self, input_ids: torch.Tensor, **_: Any) -> torch.Tensor:
        n = input_ids.shape[-1]
        positions = torch.arange(n, device=input_ids.device).expand_as(input_ids)
        return self.nld.forward_dense(input_ids, positions, causal_mask(n, input_ids.device))

    def save_pretrained(self, export_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        **_: Any) -> None:
        from safetensors.torch import save_file

        export_dir = Path(export_dir)
        tensors = {k: v.detach().cpu().contiguous() for k, v in (state_dict or self.state_dict()).items()}
        save_file(tensors, str(export_dir / SINGLE_FILE), metadata={"format": "pt"})
        (export_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")


def _register_kv_quantizers() -> None:
    """Make ModelOpt convert each layer's ``self_attn`` into a quant module with ``k_bmm_quantizer`` and
    ``v_bmm_quantizer`` (ModelOpt's names: the export turns them into ``k_proj.k_scale`` / ``v_proj.v_scale``).
    ``calibration_forward`` feeds them the post-RoPE K and V that the cache holds."""
    from modelopt.torch.quantization.nn import QuantModule, QuantModuleRegistry, TensorQuantizer

    if QuantModuleRegistry.get(Attention) is not None:
        return

    class _QuantNLDAttention(QuantModule):
        def _setup(self) -> None:
            self.k_bmm_quantizer = TensorQuantizer()
            self.v_bmm_quantizer = TensorQuantizer()

    QuantModuleRegistry.register({Attention: "trimode.NLDAttention"})(_QuantNLDAttention)


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer files, the LoRA adapter and other small files; not the weights or config.json."""
    skip = {"config.json", SINGLE_FILE, INDEX_FILE, QUANT_CONFIG_FILE}
    for item in src.iterdir():
        if item.name in skip or item.name.endswith(".safetensors"):
            continue
        if item.is_dir():
            if item.name == LORA_DIR:
                shutil.copytree(item, dst / item.name)
        elif item.stat().st_size < 64 << 20:
            shutil.copy2(item, dst / item.name)


def quantize_checkpoint(model_dir: str | Path, recipe: Recipe, out_dir: str | Path, calib_text: str,
                        calib_source: str, num_samples: int = 32, seq_len: int = 256, quantize_head: bool = False,
                        progress: bool = True) -> dict[str, Any]:
    """Quantize ``model_dir`` with ``recipe`` and export to ``out_dir`` (which must not exist). One per process."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    t0 = time.perf_counter()
    model = load_model(model_dir, dtype=torch.bfloat16)
    tokenizer = load_tokenizer(model_dir, model.config)
    calib = calibration_set(tokenizer, calib_text, calib_source, num_samples, seq_len)  # fails before ModelOpt loads
    print(f"calibration: {len(calib.samples)} samples x {seq_len} tokens from {calib.source} "
          f"({calib.num_text_tokens} tokens of text)", file=sys.stderr, flush=True)
    warnings.filterwarnings("ignore", message="transformers .* is not tested with current version of modelopt")
    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    if recipe.kv_cache == "fp8":
        _register_kv_quantizers()
    cfg, notes = modelopt_config(recipe, model, quantize_head)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mtq.quantize(model, cfg, make_forward_loop(calib, progress))
        t_cal = time.perf_counter()
        print(f"export: ModelOpt unified HF checkpoint -> {out_dir.name}/", file=sys.stderr, flush=True)
        out_dir.mkdir(parents=True)
        with torch.no_grad():
            export_hf_checkpoint(_HFExportView(model), dtype=torch.bfloat16, export_dir=out_dir)
    _copy_side_files(model_dir, out_dir)
    quant = json.loads((out_dir / QUANT_CONFIG_FILE).read_text())["quantization"]
    return {"recipe": recipe.name, "modelopt": modelopt.__version__, "quant_algo": quant.get("quant_algo"),
            "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"), "notes": notes,
            "calibration": {"source": calib.source, "num_samples": len(calib.samples), "seq_len": seq_len,
                            "text_tokens": calib.num_text_tokens},
            "seconds": {"calibration": round(t_cal - t0, 2), "export": round(time.perf_counter() - t_cal, 2)}}


def run_in_subprocess(model_dir: str | Path, recipe: str, out_dir: str | Path, calib_file: str | Path | None = None,
                      calib_text: str | None = None, num_samples: int = 32, seq_len: int = 256,
                      quantize_head: bool = False, progress: bool = True,
                      calib_dataset: str | None = None) -> dict[str, Any]:
    """Run ``quantize_checkpoint`` in a child Python (ModelOpt exports once per process); its progress goes to our
    stderr. Raises ``RuntimeError`` with the child's last error line if it fails; the child is killed if this
    process is interrupted (an exception while it runs), so it writes nothing afterwards."""
    cmd = [sys.executable, "-m", "trimode.build.quantize", "--model", str(model_dir), "--recipe", recipe,
           "--out", str(out_dir), "--calib-samples", str(num_samples), "--calib-seq-len", str(seq_len)]
    if calib_file is not None:
        cmd += ["--calib-file", str(calib_file)]
    if calib_text is not None:
        cmd += ["--calib-text", calib_text]
    if calib_dataset is not None:
        cmd += ["--calib-dataset", calib_dataset]
    if quantize_head:
        cmd.append("--quantize-head")
    if not progress:
        cmd.append("--no-progress")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    assert proc.stderr is not None and proc.stdout is not None
    try:
        for line in proc.stderr:  # progress, notes and errors pass through; the last lines explain a failure
            sys.stderr.write(line)
            err_lines.append(line.rstrip())
        out = proc.stdout.read()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.wait() != 0:
        last = next((ln for ln in reversed(err_lines) if ln.startswith("error:")), None)
        last = last or next((ln for ln in reversed(err_lines) if re.match(r"^[A-Za-z_.]*(Error|Exception): ", ln)),
                            None)
        last = last or next((ln for ln in reversed(err_lines) if ln.strip()), "no output")
        raise RuntimeError(f"quantization ({recipe}) failed: {last.removeprefix('error: ')}")
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trimode.build.quantize", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--calib-file")
    p.add_argument("--calib-text")
    p.add_argument("--calib-dataset")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--quantize-head", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if os.environ.get("TRIMODE_TEST_THREADS"):  # tests keep the child at their thread count
        torch.set_num_threads(int(os.environ["TRIMODE_TEST_THREADS"]))
    try:
        recipe = get_recipe(a.recipe)
        text, source = resolve_calibration_text(a.model, a.calib_file, a.calib_text, a.calib_dataset,
                                                a.calib_samples * a.calib_seq_len)
        summary = quantize_checkpoint(a.model, recipe, a.out, text, source, a.calib_samples, a.calib_seq_len,
                                      a.quantize_head, not a.no_progress)
    except (RecipeError, CalibrationError, CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

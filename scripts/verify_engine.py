"""Verify an engine build on a GPU host: build (or reuse) the engine directory with TensorRT, run every mode
through the TensorRT executor and the torch executor on the same prompts, and compare the greedy tokens.

    python scripts/verify_engine.py --model models/tiny-kjv --out engines/tiny-kjv [--quant fp8] [--batch 4]
    python scripts/verify_engine.py --engine engines/tiny-kjv          # an existing directory (--from-onnx done)

The engine's greedy decisions (``draft_verify`` / ``confidence_unmask`` in the graphs: docs/kernels.md "Engines
that decide") are checked too: the same executor run again returning logits must give the same tokens, and the
bytes handed to the host per step with and without decisions are reported.
Without TensorRT and a GPU it compares the onnxruntime executor instead (``--executor onnxruntime``, the CPU
proof) and says so. Exit status 0 when every mode agrees token for token (fp32 / none) or within
``--min-agreement`` (quantized recipes); the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from trimode.build.trt_compile import tensorrt_status
from trimode.plugins import tensorrt_libs
from trimode.runtime.executors.trt_executor import tensorrt_runnable
from trimode.runtime.executors.engine_dir import EngineDirError, engine_checkpoint, read_manifest
from trimode.runtime.model.checkpoint import load_model


def prompts(lm, batch: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    vocab = lm.config.vocab_size
    avoid = {lm.config.mask_token_id, *lm.config.eos_token_ids}
    out = []
    for n in (7, 12, 5, 9, 16, 3, 11, 8)[:batch]:
        ids = [t for t in torch.randint(0, vocab, (n * 2,), generator=gen).tolist() if t not in avoid][:n]
        out.append(ids)
    return out


def run_modes(lm, batch: int, new_tokens: int, block: int) -> dict[str, list[list[int]]]:
    ps = prompts(lm, batch)
    out, seconds = {}, {}
    for mode, fn in (("ar", lambda: lm.ar_generate(ps, max_new_tokens=new_tokens)),
                     ("diffusion", lambda: lm.generate(ps, max_new_tokens=new_tokens, block_length=block)),
                     ("spec", lambda: lm.linear_spec_generate(ps, max_new_tokens=new_tokens, block_length=block)),
                     ("fused_spec", lambda: lm.fused_spec_generate(ps, max_new_tokens=new_tokens,
                                                                   block_length=block))):
        t = time.perf_counter()
        out[mode] = [r.token_ids for r in fn()]
        seconds[mode] = round(time.perf_counter() - t, 3)
    out["seconds"] = seconds
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return same / max(1, sum(len(r) for r in a))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="verify_engine.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--engine", type=Path)
    p.add_argument("--quant", default="none")
    p.add_argument("--target", default="hopper", help="build target (spark / rtx: TensorRT-RTX; hopper / blackwell)")
    p.add_argument("--executor", choices=["tensorrt", "onnxruntime"], default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--block-length", type=int, default=8)
    p.add_argument("--min-agreement", type=float, default=0.9)
    a = p.parse_args(argv)
    tensorrt_libs.reexec_with_loader_path()  # TensorRT-RTX plugin engines: libtensorrt_rtx.so on the loader path
    usable, reason = tensorrt_runnable(a.engine) if a.engine else tensorrt_status(a.target)
    executor = a.executor or ("tensorrt" if usable else "onnxruntime")
    if executor == "tensorrt" and not usable:
        print(f"error: TensorRT cannot run here: {reason}", file=sys.stderr)
        return 2
    engine = a.engine or a.out
    if engine is None:
        print("error: pass --engine DIR, or --model DIR --out DIR to build one", file=sys.stderr)
        return 2
    if a.engine is None:
        build = [sys.executable, str(Path(__file__).with_name("build_engine.py")), "--model", str(a.model), "--out",
                 str(a.out), "--quant", a.quant, "--block-length", str(a.block_length), "--page-size", "16",
                 "--target", a.target]
        if subprocess.run(build).returncode != 0:
            return 2
    try:
        manifest = read_manifest(engine)
        device = "cuda" if executor == "tensorrt" else "cpu"
        from trimode.runtime.api import TriModeLM
        if executor == "tensorrt":
            from trimode.runtime.model.checkpoint import load_tokenizer
            from trimode.runtime.executors.trt_executor import TensorRTExecutor

            model = load_model(engine_checkpoint(engine)).to(device)
            lm = TriModeLM(model, load_tokenizer(engine_checkpoint(engine), model.config),
                           page_size=manifest["shapes"]["page_size"],
                           executor=lambda model, cache: TensorRTExecutor(engine, cache))
        else:
            lm = TriModeLM.from_engine(engine, executor="onnxruntime")
        ref = TriModeLM.from_engine(engine, executor="torch")
        if device == "cuda":
            ref = type(ref)(ref.model.to(device), ref.tokenizer,
                            page_size=manifest["shapes"]["page_size"])
    except (EngineDirError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    moved = {}
    for decide in (False, True) if lm.executor.decides else (False,):  # decisions last: ``got`` holds them
        lm.engine.decide, before, steps = decide, lm.executor.output_bytes, lm.engine.num_steps
        got = run_modes(lm, a.batch, a.new_tokens, a.block_length)
        moved[decide] = round((lm.executor.output_bytes - before) / max(1, lm.engine.num_steps - steps))
        with_logits = with_logits if decide else got
    want = run_modes(ref, a.batch, a.new_tokens, a.block_length)
    report = {"engine": str(engine), "executor": executor, "recipe": manifest["recipe"]["name"],
              "decides": lm.executor.decides,
              "bytes_per_step": {"logits": moved[False], "decisions": moved.get(True)},
              "modes": {}, "seconds": {executor: got["seconds"], "torch": want["seconds"]}}
    ok = True
    for mode in ("ar", "diffusion", "spec", "fused_spec"):
        agree = agreement(want[mode], got[mode])
        exact = want[mode] == got[mode]
        same_as_logits = with_logits[mode] == got[mode]
        report["modes"][mode] = {"identical": exact, "agreement": round(agree, 4),
                                 "decisions_equal_logits": same_as_logits}
        if manifest["recipe"]["name"] == "none":
            ok &= exact and same_as_logits
        else:  # the decisions' head is its own GEMM: a near tie may fall the other way
            ok &= agree >= a.min_agreement and agreement(with_logits[mode], got[mode]) >= a.min_agreement
        print(f"{mode:10s} {'identical' if exact else f'agreement {agree:.3f}'}; decisions "
              f"{'==' if same_as_logits else '!='} logits", file=sys.stderr)
    print(f"bytes handed back per step: {moved[False]} with logits, {moved.get(True)} with the engine's decisions"
          + ("" if lm.executor.decides else " (these engines do not decide: built before GRAPH_VERSION 3)"),
          file=sys.stderr)
    if executor != "tensorrt":
        print(f"note: TensorRT not used ({reason}); compared the onnxruntime executor", file=sys.stderr)
    report["ok"] = bool(ok)
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

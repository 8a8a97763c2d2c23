#!/usr/bin/env python3
"""Generate from one prompt in every mode (AR, block diffusion, self-speculation) with one runtime and one
KV cache, and print tokens per forward and tokens/s for each. Ends with one JSON line.

With --engine DIR the runtime runs an engine directory (scripts/build_engine.py) through --executor
(onnxruntime by default); otherwise the checkpoint --model through the torch executor."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-kjv"), help="checkpoint directory")
    ap.add_argument("--engine", default=None, help="engine directory (overrides --model)")
    ap.add_argument("--executor", choices=["onnxruntime", "torch"], default="onnxruntime",
                    help="executor for --engine")
    ap.add_argument("--prompt", default="Genesis 1\n1 In the beginning God created the heaven and the earth.\n2")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=16)
    args = ap.parse_args()

    import torch

    from trimode.runtime.api import TriModeLM
    from trimode.runtime.request import ARConfig, DiffusionConfig, SpecConfig

    torch.manual_seed(0)
    if args.engine:
        lm = TriModeLM.from_engine(args.engine, executor=args.executor)
        source = f"engine {Path(args.engine).name} ({args.executor} executor)"
    else:
        lm = TriModeLM.from_pretrained(args.model)
        source = f"checkpoint {Path(args.model).name} (torch executor)"
    modes = {
        "ar": ARConfig(),
        "diffusion (tau=0.9)": DiffusionConfig(args.block_length, threshold=0.9),
        "spec (LoRA drafter)": SpecConfig(args.block_length, use_lora=True),
        "spec (no LoRA)": SpecConfig(args.block_length, use_lora=False),
    }
    print(f"{source}\nprompt: {args.prompt!r}\n")
    rows = []
    for name, mode in modes.items():
        request = lm.request(args.prompt, args.max_new_tokens, mode)
        lm.run([request])  # warm-up
        start = time.perf_counter()
        result = lm.run([request])[0]
        elapsed = time.perf_counter() - start
        row = {"mode": name, "tokens": len(result.token_ids), "forwards": result.num_forwards,
               "tokens_per_forward": round(result.tokens_per_forward, 3),
               "mean_accepted_length": result.mean_accepted_length and round(result.mean_accepted_length, 3),
               "tokens_per_s": round(len(result.token_ids) / elapsed, 1)}
        rows.append(row)
        print(f"== {name}: {row['tokens']} tokens, {row['forwards']} forwards, "
              f"{row['tokens_per_forward']:.2f} tokens/forward, {row['tokens_per_s']:.1f} tokens/s")
        print(result.text.strip().replace("\n", "\n   "), "\n")
    assert lm.cache.stats().num_free_pages == lm.cache.num_pages
    print(json.dumps({"source": source, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

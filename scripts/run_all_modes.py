#!/usr/bin/env python3
"""Generate from one prompt in every mode (AR, block diffusion, linear and fused self-speculation, and mode
auto choosing per step from this machine's pass costs) with one runtime and one KV cache, and print, per mode,
tokens per forward, accepted tokens per verify, tokens/s and the speed relative to AR, next to what this
machine's measured pass costs predict. Ends with one JSON line.

Why spec or diffusion is (or is not) faster than AR here: a B-token pass costs c(B) against c(1) for a
one-token decode (runtime/profiling.py measures both on this machine, executor and model), so a mode beats AR
only when its tokens per forward exceed c(B)/c(1). The prediction is tokens x c(1) / (sum over the run's
forwards of their pass costs); the measured ratio also pays the host work between passes.

With --engine DIR the runtime runs an engine directory (scripts/build_engine.py) through --executor
(onnxruntime by default); otherwise the checkpoint --model through the torch executor."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = 64  # committed prefix of the pass-cost measurement (about the prompt + half the output)


def pass_costs(lm, block: int, fused_tokens: int, auto_blocks: tuple[int, ...]):
    """(median ms of one batch-1 pass on this machine by kind: decode (1 token), verify / draft / denoise
    (``block``), and "fused" (a verify pass of ``fused_tokens``: a fused spec step's chain and sub-blocks);
    the ``PassCostTable`` of every measured point, for mode auto)."""
    from trimode.runtime import profiling
    from trimode.runtime.scheduling import PassCostTable

    tokens = sorted({block, fused_tokens, *auto_blocks, *(b * 5 for b in auto_blocks)})
    measured = profiling.pass_costs(lm.executor, lm.config.mask_token_id, token_counts=tokens, batch_sizes=(1,),
                                    kinds=("decode", "verify", "draft", "denoise"), context_len=CONTEXT, repeats=30)
    table = PassCostTable({(c.kind, c.batch, c.num_tokens): c.median_ms for c in measured}, "run_all_modes")
    costs = {c.kind: c.median_ms for c in measured if c.num_tokens in (1, block) and c.kind != "decode"
             or c.kind == "decode"}
    costs["fused"] = table.cost_ms("verify", 1, fused_tokens)
    return costs, table


def predicted_vs_ar(result, costs: dict[str, float], fused: bool = False) -> float:
    """tokens x c(1) over the summed cost of the run's forwards (prefill excluded; commit costs a verify; a fused
    spec step, counted as a verify, costs its chain and sub-blocks)."""
    by_kind = {"decode": costs["decode"], "verify": costs["fused" if fused else "verify"], "commit": costs["verify"],
               "draft": costs["draft"], "denoise": costs["denoise"]}
    spent = sum(n * by_kind[k] for k, n in result.forwards.items() if k in by_kind)
    return len(result.token_ids) * costs["decode"] / spent if spent else 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-kjv"), help="checkpoint directory")
    ap.add_argument("--engine", default=None, help="engine directory (overrides --model)")
    ap.add_argument("--executor", choices=["onnxruntime", "torch"], default="onnxruntime",
                    help="executor for --engine")
    ap.add_argument("--prompt", default="Genesis 1\n1 In the beginning God created the heaven and the earth.\n2")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0,
                    help="the runtime's CPU threads (runtime.settings; default 0: this machine's default)")
    ap.add_argument("--no-prepack", action="store_true",
                    help="onnxruntime: keep one copy of the weights (default here: each graph's session prepacks "
                         "its own copy, which makes block passes cheaper)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per mode, interleaved (the best is kept)")
    args = ap.parse_args()

    import torch

    from trimode.runtime.api import TriModeLM
    from trimode.runtime.request import ARConfig, AutoConfig, DiffusionConfig, FusedSpecConfig, SpecConfig
    from trimode.runtime.settings import RuntimeSettings

    torch.manual_seed(0)
    settings = RuntimeSettings(threads=args.threads)
    if args.engine:
        extra = {"prepack": not args.no_prepack} if args.executor == "onnxruntime" else {}
        lm = TriModeLM.from_engine(args.engine, executor=args.executor, settings=settings, **extra)
        source = f"engine {Path(args.engine).name} ({args.executor} executor" + \
            (", prepacked weights" if extra.get("prepack") else "") + ")"
    else:
        lm = TriModeLM.from_pretrained(args.model, settings=settings)
        source = f"checkpoint {Path(args.model).name} (torch executor)"
    threads = getattr(lm.executor, "threads", None)
    modes = {
        "ar": ARConfig(),
        "diffusion (tau=0.9)": DiffusionConfig(args.block_length, threshold=0.9),
        "spec (LoRA drafter)": SpecConfig(args.block_length, use_lora=True),
        "spec (no LoRA)": SpecConfig(args.block_length, use_lora=False),
        "fused spec": FusedSpecConfig(args.block_length),
        "auto": AutoConfig.up_to(args.block_length),
    }
    fused = modes["fused spec"]
    print(f"{source}, {threads} threads (torch {torch.get_num_threads()})\nprompt: {args.prompt!r}\n")
    costs, table = pass_costs(lm, args.block_length, fused.next_block_length * (1 + fused.num_subblocks),
                              modes["auto"].block_lengths)
    lm.engine.scheduler.costs = table  # mode auto decides from this machine's pass costs
    requests = {name: lm.request(args.prompt, args.max_new_tokens, mode) for name, mode in modes.items()}
    results, best = {}, dict.fromkeys(modes, float("inf"))
    for name, request in requests.items():
        lm.run([request])  # warm-up
    for _ in range(max(1, args.repeats)):  # modes interleaved: a busy moment of a shared machine hits all of them
        for name, request in requests.items():
            start = time.perf_counter()
            results[name] = lm.run([request])[0]
            best[name] = min(best[name], time.perf_counter() - start)
    rows, ar_tps = [], None
    for name, result in results.items():
        tps = len(result.token_ids) / best[name]
        ar_tps = ar_tps or tps
        accepted = result.mean_accepted_length
        row = {"mode": name, "tokens": len(result.token_ids), "forwards": result.num_forwards,
               "tokens_per_forward": round(result.tokens_per_forward, 3),
               "mean_accepted_length": accepted and round(accepted, 3), "tokens_per_s": round(tps, 1),
               "vs_ar": round(tps / ar_tps, 3),
               "predicted_vs_ar": round(predicted_vs_ar(result, costs, fused=name == "fused spec"), 3)}
        if result.auto_choices:
            row["auto_choices"] = result.auto_choices
        rows.append(row)
        names = {"verify": "fused steps"} if name == "fused spec" else {}  # a fused step is one verify forward
        kinds = ", ".join(f"{names.get(k, k)} {n}" for k, n in result.forwards.items() if n and k != "prefill")
        print(f"== {name}: {row['tokens']} tokens, {row['forwards']} forwards ({kinds}), "
              f"{row['tokens_per_forward']:.2f} tokens/forward"
              + (f", {accepted:.2f} accepted/verify" if accepted else "")
              + f", {tps:.0f} tokens/s = {row['vs_ar']:.2f}x AR (pass costs predict {row['predicted_vs_ar']:.2f}x)"
              + (f"; auto chose {result.auto_choices}" if result.auto_choices else ""))
        print("  ", result.text.strip().replace("\n", "\n   "), "\n")
    assert lm.cache.stats().num_free_pages == lm.cache.num_pages
    ratios = {k: round(costs[k] / costs["decode"], 2) for k in ("verify", "draft", "denoise")}
    block = args.block_length
    print(f"this machine, batch 1, {CONTEXT}-token context: a 1-token decode pass {costs['decode']:.2f} ms; "
          f"c({block})/c(1) = " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"spec and diffusion beat AR only where their tokens per forward exceed c({block})/c(1) (here about "
          f"{max(ratios.values()):.1f}); `trimode profile` measures the whole table (T = 1..64, batch 1/4/16).")
    print(json.dumps({"source": source, "threads": threads, "pass_ms": {k: round(v, 3) for k, v in costs.items()},
                      f"c{block}_over_c1": ratios, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

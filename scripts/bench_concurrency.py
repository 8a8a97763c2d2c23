#!/usr/bin/env python3
"""Throughput against concurrency for AR, linear spec, fused spec and mode ``auto``, on both executors, in one run.

    python scripts/bench_concurrency.py [--model models/tiny-kjv] [--executors torch onnxruntime]
        [--concurrency 1 2 4 8 16] [--max-new-tokens 48] [--block-length 16] [--rounds 3] [--out results/concurrency]

For each executor (torch on the checkpoint; onnxruntime on its engine directory, built first by the ONNX stage),
the pass costs are measured first on this machine (runtime.profiling: decode, draft and verify passes at the
block lengths auto may use and every concurrency level) and given to the scheduler, as ``trimode profile --save``
would. Then, at each concurrency level c, c requests (held-out KJV chapter openings, scripts/bench.py's ``free``
set) run together to completion in each mode, modes interleaved, ``--rounds`` times (the median round kept):
throughput = output tokens / wall time of the level; per-request tokens/s = a request's tokens over its own
wall time (mean over the requests). For ``auto`` the share of the wall time spent deciding is recorded.

Writes ``concurrency.json`` and ``concurrency.png`` into ``--out``; the last stdout line is a JSON summary: per
executor and level, tokens/s per mode and ``auto`` over the best of the other three.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

MODES = ("ar", "spec", "fused_spec", "auto")


def open_runtime(model: Path, executor: str, block_length: int, max_pages: int):
    from trimode.runtime.api import TriModeLM

    if executor == "torch":
        return TriModeLM.from_pretrained(model, num_pages=max_pages)
    from trimode.build.pipeline import BuildOptions, build

    engine_dir = ROOT / "engines" / f"concurrency-b{block_length}"
    build(BuildOptions(model=model, out=engine_dir, block_length=block_length, max_seq=512, overwrite=True),
          log=lambda msg: None)  # returns at once when the directory is up to date
    return TriModeLM.from_engine(engine_dir, executor="onnxruntime")


def measure_costs(lm, block_lengths: list[int], batches: list[int], repeats: int, fused_subblocks: int) -> dict:
    from trimode.runtime import profiling

    # every pass auto may weigh: blocks for spec, a block with its sub-blocks (B x (1 + K)) for fused spec
    tokens = sorted({1, *block_lengths, *(b * (1 + fused_subblocks) for b in block_lengths)})
    return profiling.profile(lm, "bench_concurrency", lm.settings.executor, tokens, batches,
                             ["decode", "draft", "verify"], context_len=64, repeats=repeats, host_modes=[])


def run_level(lm, prompts: list[str], mode: str, concurrency: int, max_new_tokens: int, block_length: int) -> dict:
    from trimode.runtime.request import mode_config

    config = mode_config(mode, block_length)
    requests = [lm.request(prompts[i % len(prompts)], max_new_tokens, config) for i in range(concurrency)]
    sched = lm.engine.scheduler.stats
    decide_before = sched.seconds
    start = time.perf_counter()
    results = lm.run(requests)
    wall = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    choices: dict[str, int] = {}
    for r in results:
        for k, v in r.auto_choices.items():
            choices[k] = choices.get(k, 0) + v
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "per_request_tokens_per_s": statistics.mean(len(r.token_ids) / r.wall_time_s for r in results),
            "tokens_per_forward": tokens / max(sum(r.num_forwards for r in results), 1),
            "decide_share": (sched.seconds - decide_before) / wall, "auto_choices": choices,
            "token_ids": [r.token_ids for r in results]}


def sweep(lm, prompts: list[str], levels: list[int], rounds: int, max_new_tokens: int, block_length: int) -> list[dict]:
    out = []
    for c in levels:
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for _ in range(rounds):
            for mode in MODES:
                runs[mode].append(run_level(lm, prompts, mode, c, max_new_tokens, block_length))
        level = {"concurrency": c}
        for mode, rs in runs.items():
            best = sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2]  # the median round
            level[mode] = {k: v for k, v in best.items() if k != "token_ids"}
        level["auto_matches_ar"] = runs["auto"][0]["token_ids"] == runs["ar"][0]["token_ids"]
        level["auto_over_best"] = level["auto"]["tokens_per_s"] / max(level[m]["tokens_per_s"]
                                                                       for m in MODES if m != "auto")
        print(f"  c={c:2d}  " + "  ".join(f"{m} {level[m]['tokens_per_s']:7.1f} tok/s" for m in MODES)
              + f"  auto/best {level['auto_over_best']:.3f}  auto chose {level['auto']['auto_choices']}",
              file=sys.stderr)
        out.append(level)
    return out


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"ar": "o-", "spec": "s--", "fused_spec": "d:", "auto": "^-"}
    for executor, levels in results["executors"].items():
        xs = [lv["concurrency"] for lv in levels]
        for mode in MODES:
            axes[0].plot(xs, [lv[mode]["tokens_per_s"] for lv in levels], styles[mode], label=f"{executor} {mode}")
            axes[1].plot(xs, [lv[mode]["per_request_tokens_per_s"] for lv in levels], styles[mode],
                         label=f"{executor} {mode}")
    for ax, title in zip(axes, ("throughput (output tokens/s)", "per-request tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    meta = results["meta"]
    fig.suptitle(f"{meta['model']}, {meta['max_new_tokens']} new tokens, block {meta['block_length']} "
                 f"({meta['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-kjv"))
    ap.add_argument("--executors", nargs="+", choices=["torch", "onnxruntime"], default=["torch", "onnxruntime"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cost-repeats", type=int, default=7, help="timed forwards per pass-cost point")
    ap.add_argument("--out", default=str(ROOT / "results" / "concurrency"))
    args = ap.parse_args(argv)

    from bench import prompt_sets

    from trimode.runtime.request import AutoConfig
    from trimode.runtime.scheduling import PassCostTable

    model = Path(args.model)
    prompts = prompt_sets(max(args.concurrency), 2, seed=0)["free"]
    lengths = list(AutoConfig.up_to(args.block_length).block_lengths)
    try:
        label = str(model.resolve().relative_to(ROOT))
    except ValueError:
        label = model.name
    results: dict = {"meta": {"model": label, "max_new_tokens": args.max_new_tokens,
                              "block_length": args.block_length, "auto_block_lengths": lengths,
                              "rounds": args.rounds, "machine": f"{platform.machine()}, {_cpus()} CPUs",
                              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")},
                     "executors": {}, "costs": {}}
    for executor in args.executors:
        lm = open_runtime(model, executor, args.block_length, max_pages=max(args.concurrency) * 16 + 64)
        print(f"{executor}: measuring pass costs (batches {args.concurrency})", file=sys.stderr)
        costs = measure_costs(lm, lengths, args.concurrency, args.cost_repeats, AutoConfig().fused_subblocks)
        lm.engine.scheduler.costs = PassCostTable.from_result(costs, f"{executor} measured")
        results["costs"][executor] = costs["ratios"]
        lm.ar_generate(prompts[:1], max_new_tokens=8)  # warm-up
        results["executors"][executor] = sweep(lm, prompts, args.concurrency, args.rounds, args.max_new_tokens,
                                               args.block_length)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "concurrency.json").write_text(json.dumps(results, indent=1) + "\n")
    drawn = plot(results, out / "concurrency.png")
    print(f"wrote {out / 'concurrency.json'}" + (f" and {out / 'concurrency.png'}" if drawn else ""), file=sys.stderr)
    summary = {ex: {lv["concurrency"]: {**{m: round(lv[m]["tokens_per_s"], 1) for m in MODES},
                                        "auto_over_best": round(lv["auto_over_best"], 3),
                                        "decide_share": round(lv["auto"]["decide_share"], 4),
                                        "auto_matches_ar": lv["auto_matches_ar"]}
                    for lv in levels} for ex, levels in results["executors"].items()}
    print(json.dumps(summary))
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())

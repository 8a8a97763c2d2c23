#!/usr/bin/env python3
"""Decoding benchmark: every mode on fixed-seed prompt sets, in one run, with one runtime.

Prompt sets (from the King James Bible corpus of the shipped model, scripts/kjv_corpus.py):
  free        the opening verses of held-out chapters (never seen in training);
  structured  passages whose continuation is predictable: genealogies, refrains, well-known openings.
Modes: AR; diffusion at tau in {0.7, 0.9}; spec with and without the LoRA drafter; fused spec with 2 and 4
sub-blocks of block / 2 (``fused_vs_spec``: its tokens per forward and tokens/s over linear spec's with the LoRA,
same set, batch and block); block 8 / 16 / 32; batch 1 and 4 (``--modes`` picks a subset; ``--pass-costs`` adds
c(T)/c(1) of the passes spec and fused spec run). For each: tokens per forward, mean accepted length per verify, tokens/s, speed-up over AR
measured in the same run (same set, same batch), and the distinct-4-gram ratio of the output.
Writes results.json and a PNG plot into --out; the last stdout line is the JSON summary.

--thread-plans compares, for the onnxruntime executor at block 16, who gets the CPU threads
(runtime.settings.ThreadPlan): both libraries' defaults (torch's and onnxruntime's pools at the machine's thread
count, onnxruntime's threads spinning between runs: what happens when nothing coordinates them), the plan at
the machine's thread count, and the runtime's default plan.

--host-bytes compares, per executor, mode, block and batch, greedy decoding with the engines' decisions
(docs/kernels.md "Engines that decide") against the same engine returning logits: the bytes the executor hands
back per step and per greedy verify step (one verify forward of the batch, measured directly), tokens/s of each
(best of --repeats, interleaved: not the median), and whether the tokens are the same; plus the bytes per verify
step computed for NLD-8B's vocabulary at each block. It writes host_bytes.json into --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

STRUCTURED_CHAPTERS = ["Genesis 5", "Genesis 11", "Numbers 7", "Numbers 29", "1 Chronicles 1", "Psalms 136",
                       "Matthew 1", "Genesis 1"]


def prompt_sets(num_prompts: int, prompt_verses: int, seed: int) -> dict[str, list[str]]:
    import kjv_corpus

    train, heldout = kjv_corpus.load_splits()
    held = kjv_corpus.documents(heldout)
    rng = random.Random(seed)
    free = [_opening(doc, prompt_verses) for doc in rng.sample(held, min(num_prompts, len(held)))]
    by_title = {doc.split("\n", 1)[0]: doc for doc in kjv_corpus.documents(train) + held}
    structured = [_opening(by_title[t], prompt_verses) for t in STRUCTURED_CHAPTERS if t in by_title]
    return {"free": free, "structured": structured[:num_prompts]}


def _opening(doc: str, verses: int) -> str:
    """The chapter header, its first ``verses`` verses, and the next verse number (the model continues)."""
    lines = doc.strip("\n").split("\n")
    head = lines[:1 + verses]
    return "\n".join(head) + f"\n{verses + 1}"


def distinct_4grams(tokens: list[int]) -> float:
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


def configurations(blocks: list[int], modes: list[str] | None = None):
    from trimode.runtime.request import ARConfig, DiffusionConfig, FusedSpecConfig, SpecConfig

    def wanted(mode: str) -> bool:
        return modes is None or mode in modes

    yield "ar", {}, ARConfig()
    for block in blocks:
        if wanted("diffusion"):
            for tau in (0.7, 0.9):
                yield "diffusion", {"block": block, "tau": tau}, DiffusionConfig(block, threshold=tau)
        if wanted("spec"):
            for lora in (True, False):
                yield "spec", {"block": block, "lora": lora}, SpecConfig(block, use_lora=lora)
        if wanted("fused_spec"):
            for k in (2, 4):  # sub-blocks of block / 2 (the default); 4 is the default K
                cfg = FusedSpecConfig(block, min(k, block))
                yield "fused_spec", {"block": block, "K": cfg.num_subblocks, "sub": cfg.next_block_length}, cfg


def fused_pass_costs(lm, blocks: list[int], batches: list[int], repeats: int) -> list[dict]:
    """c(T)/c(1) of the passes a fused spec step runs at each block B (default K = 4 sub-blocks of B/2): its chain
    (a verify pass of B tokens) and its sub-blocks (K draft passes of B/2 per sequence), and linear spec's draft
    and verify passes of B, at each batch N (runtime.profiling; median of ``repeats`` forwards)."""
    from trimode.runtime.profiling import pass_costs
    from trimode.runtime.scheduling import PassCostTable

    tokens = sorted({1, *blocks, *(max(1, b // 2) for b in blocks)})
    batch_sizes = sorted({*batches, *(4 * n for n in batches)})
    costs = pass_costs(lm.executor, lm.config.mask_token_id, tokens, batch_sizes, ["decode", "verify", "draft"],
                       64, repeats)
    table = PassCostTable({(c.kind, c.batch, c.num_tokens): c.median_ms for c in costs})
    rows = []
    for block in blocks:
        sub = max(1, block // 2)
        for n in batches:
            one = table.cost_ms("decode", n, 1)
            rows.append({"block": block, "batch": n, "decode_ms": round(one, 3),
                         "spec_draft_plus_verify": round((table.cost_ms("draft", n, block)
                                                          + table.cost_ms("verify", n, block)) / one, 3),
                         "fused_chain_plus_subblocks": round((table.cost_ms("verify", n, block)
                                                              + table.cost_ms("draft", 4 * n, sub)) / one, 3)})
    return rows


def run_one(lm, prompts: list[str], mode, batch: int, max_new_tokens: int, repeats: int) -> dict:
    """Greedy, so every repeat produces the same tokens; the time is the median over repeats."""
    times = []
    for _ in range(repeats):
        results, elapsed = [], 0.0
        for i in range(0, len(prompts), batch):
            requests = [lm.request(p, max_new_tokens, mode) for p in prompts[i:i + batch]]
            start = time.perf_counter()
            results += lm.run(requests)
            elapsed += time.perf_counter() - start
        times.append(elapsed)
    elapsed = sorted(times)[len(times) // 2]
    tokens = sum(len(r.token_ids) for r in results)
    forwards = sum(r.num_forwards for r in results)
    accepted = [n for r in results for n in r.accepted_lengths]
    return {"num_tokens": tokens, "num_forwards": forwards, "tokens_per_forward": tokens / forwards,
            "mean_accepted_length": sum(accepted) / len(accepted) if accepted else None,
            "tokens_per_s": tokens / elapsed, "wall_s": elapsed,
            "distinct_4gram": sum(distinct_4grams(r.token_ids) for r in results) / len(results),
            "sample": results[0].text, "digest": hashlib.sha256(str([r.token_ids for r in results]).encode()).hexdigest()[:16]}


def engine_dir_for(args: argparse.Namespace) -> Path:
    """The ONNX stage of the build (returns at once when the directory is up to date, rebuilds it when the model
    or the settings changed)."""
    from trimode.build.pipeline import BuildOptions, build

    engine_dir = Path(args.engine_dir or ROOT / "engines" / f"bench-b{max(args.blocks)}")
    build(BuildOptions(model=Path(args.model), out=engine_dir, block_length=max(args.blocks), max_seq=1024,
                       overwrite=True), log=lambda msg: None)
    return engine_dir


def open_runtime(args: argparse.Namespace, executor: str, threads: int | None = None, **executor_kwargs):
    from trimode.runtime.api import TriModeLM
    from trimode.runtime.settings import RuntimeSettings

    settings = RuntimeSettings(threads=args.threads if threads is None else threads)
    if executor == "torch":
        return TriModeLM.from_pretrained(args.model, settings=settings)
    return TriModeLM.from_engine(engine_dir_for(args), executor="onnxruntime", settings=settings,
                                 prepack=args.prepack, **executor_kwargs)


def thread_plans(args: argparse.Namespace, sets: dict[str, list[str]]) -> list[dict]:
    """AR, diffusion (tau 0.9) and spec (LoRA) at block 16 under three thread plans of the onnxruntime executor,
    interleaved over ``args.repeats`` rounds (best time kept), in one process."""
    import torch

    from trimode.runtime.request import ARConfig, DiffusionConfig, SpecConfig
    from trimode.runtime.settings import machine_threads

    machine = machine_threads()
    plans = {f"library defaults (torch {machine}, onnxruntime {machine}, spinning)": dict(threads=machine, spin=True),
             f"ThreadPlan, {machine} threads (torch 1, onnxruntime {machine})": dict(threads=machine),
             "ThreadPlan, runtime default": dict(threads=0)}
    modes = {"ar": ARConfig(), "diffusion tau=0.9": DiffusionConfig(16, threshold=0.9),
             "spec lora": SpecConfig(16, use_lora=True)}
    prompts = sets["free"][:args.num_prompts]
    best: dict[tuple[str, str, int], float] = {}
    tokens: dict[tuple[str, str, int], int] = {}
    runtimes = {name: open_runtime(args, "onnxruntime", **kw) for name, kw in plans.items()}
    for _ in range(args.repeats):
        for name, lm in runtimes.items():
            # the last executor made set torch's pool: each plan sets it again before its runs
            torch.set_num_threads(machine if plans[name].get("spin") else lm.executor.plan.torch_threads)
            for mode_name, mode in modes.items():
                for batch in args.batches:
                    m = run_one(lm, prompts, mode, batch, args.max_new_tokens, 1)
                    key = (name, mode_name, batch)
                    best[key] = min(best.get(key, float("inf")), m["wall_s"])
                    tokens[key] = m["num_tokens"]
    rows = []
    for (name, mode_name, batch), wall in best.items():
        ar = tokens[(name, "ar", batch)] / best[(name, "ar", batch)]
        tps = tokens[(name, mode_name, batch)] / wall
        rows.append({"plan": name, "mode": mode_name, "batch": batch, "tokens_per_s": tps, "vs_ar": tps / ar})
        print(f"{name:58s} {mode_name:18s} b={batch} tok/s {tps:7.1f}  x{tps / ar:4.2f} AR", flush=True)
    return rows


NLD_8B_VOCAB = 131072  # spec/model.md, the 3B / 8B / 14B configs


def verify_step_bytes(lm, batch: int, block: int) -> dict[bool, int]:
    """Bytes one greedy verify forward of ``batch`` sequences of ``block`` tokens hands the host, with the engine's
    decision and with logits (the executor's ``output_bytes``)."""
    from trimode.runtime.passes import PassKind, SeqPass

    cache, ex, prompt = lm.cache, lm.executor, tuple(range(5, 21))
    ids = [2_000_000 + i for i in range(batch)]
    for sid in ids:
        cache.add_sequence(sid)
        cache.reserve(sid, len(prompt) + block)
    try:
        ex.forward([SeqPass(sid, PassKind.PREFILL, prompt, 0) for sid in ids])
        out = {}
        for decide in (True, False):
            before = ex.output_bytes
            ex.forward([SeqPass(sid, PassKind.VERIFY, tuple(range(5, 5 + block)), len(prompt), num_logits=block,
                                decide=decide) for sid in ids])
            out[decide] = ex.output_bytes - before
        return out
    finally:
        for sid in ids:
            cache.free(sid)


def host_bytes(args: argparse.Namespace, sets: dict[str, list[str]]) -> list[dict]:
    """The --host-bytes comparison (module docstring), one row per executor, mode configuration and batch."""
    rows = []
    prompts = sets["free"][:args.num_prompts]
    for executor in args.executor:
        lm = open_runtime(args, executor)
        assert lm.executor.decides, f"the {executor} executor here does not decide"
        for _, _, mode in configurations(args.blocks[:1], args.modes):  # warm-up every code path both ways
            for decide in (True, False):
                lm.engine.decide = decide
                lm.run([lm.request(prompts[0], 16, mode)])
        for mode_name, params, mode in configurations(args.blocks, args.modes):
            for batch in args.batches:
                best, moved, tokens = {}, {}, {}
                for _ in range(args.repeats):
                    for decide in (False, True):
                        lm.engine.decide = decide
                        before, steps = lm.executor.output_bytes, lm.engine.num_steps
                        m = run_one(lm, prompts, mode, batch, args.max_new_tokens, 1)
                        moved[decide] = (lm.executor.output_bytes - before) / (lm.engine.num_steps - steps)
                        best[decide] = max(best.get(decide, 0.0), m["tokens_per_s"])
                        tokens[decide] = m["digest"]
                lm.engine.decide = True
                label = mode_name + "".join(f" {k}={v}" for k, v in params.items())
                row = {"executor": executor, "mode": mode_name, **params, "label": label, "batch": batch,
                       "bytes_per_step_logits": moved[False], "bytes_per_step_decided": moved[True],
                       "tokens_per_s_logits": best[False], "tokens_per_s_decided": best[True],
                       "speedup": best[True] / best[False], "same_tokens": tokens[True] == tokens[False]}
                if "block" in params:
                    step = verify_step_bytes(lm, batch, params["block"])
                    row.update(verify_step_bytes_logits=step[False], verify_step_bytes_decided=step[True])
                rows.append(row)
                print(f"{executor:11s} b={batch} {label:28s} bytes/step {moved[False]:10.0f} -> {moved[True]:6.0f}  "
                      f"tok/s {best[False]:7.1f} -> {best[True]:7.1f} (x{row['speedup']:.2f})  same tokens: "
                      f"{row['same_tokens']}", flush=True)
    for block in args.blocks:
        rows.append({"executor": "computed", "model": "NLD-8B", "block": block, "batch": 1,
                     "verify_step_bytes_logits": block * NLD_8B_VOCAB * 4, "verify_step_bytes_decided": 8})
        print(f"NLD-8B (V = {NLD_8B_VOCAB}, computed) one greedy verify step of block {block}: "
              f"{block * NLD_8B_VOCAB * 4} bytes of logits -> 8 bytes of decision per sequence", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 8), sharex=True)
    labels = sorted({r["label"] for r in rows}, key=[r["label"] for r in rows].index)
    for col, batch in enumerate((1, 4)):
        for row, metric in enumerate(("tokens_per_forward", "speedup_vs_ar")):
            ax = axes[row][col]
            for k, name in enumerate(("free", "structured")):
                values = {r["label"]: r[metric] for r in rows if r["batch"] == batch and r["set"] == name}
                xs = [i + (k - 0.5) * 0.4 for i in range(len(labels))]
                ax.bar(xs, [values.get(lbl, 0) for lbl in labels], width=0.4, label=name)
            ax.set_title(f"{metric.replace('_', ' ')}, batch {batch}")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.legend()
    for ax in axes[1]:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-kjv"))
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"))
    ap.add_argument("--executor", choices=["torch", "onnxruntime"], nargs="+", default=["torch"],
                    help="one or both; onnxruntime runs the engine directory built from --model (ONNX stage)")
    ap.add_argument("--engine-dir", default=None, help="where --executor onnxruntime builds the engine "
                    "(default engines/bench-b<largest block>; reused when up to date)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-verses", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--blocks", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="the runtime's CPU threads (runtime.settings; default 0: the runtime's default)")
    ap.add_argument("--prepack", action="store_true",
                    help="onnxruntime: each graph's session prepacks its own copy of the weights")
    ap.add_argument("--thread-plans", action="store_true",
                    help="only compare thread plans of the onnxruntime executor (block 16; see above)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (the median; --host-bytes: the best)")
    ap.add_argument("--modes", nargs="+", choices=["diffusion", "spec", "fused_spec"], default=None,
                    help="besides AR, only these modes (default: all)")
    ap.add_argument("--host-bytes", action="store_true",
                    help="compare the engines' decisions with logits: bytes to the host per step, tokens/s")
    ap.add_argument("--pass-costs", action="store_true",
                    help="also measure c(T)/c(1) of the passes spec and fused spec run at each block and batch")
    args = ap.parse_args()

    import torch

    sets = prompt_sets(args.num_prompts, args.prompt_verses, args.seed)
    if args.thread_plans or args.host_bytes:
        rows = thread_plans(args, sets) if args.thread_plans else host_bytes(args, sets)
        if args.host_bytes:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "host_bytes.json").write_text(json.dumps({"command": " ".join(["scripts/bench.py", *sys.argv[1:]]),
                                                             "rows": rows}, indent=1) + "\n")
        print(json.dumps({"command": " ".join(["scripts/bench.py", *sys.argv[1:]]),
                          "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "rows": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                                   for r in rows]}))
        return 0
    rows, costs = [], []
    for executor in args.executor:
        lm = open_runtime(args, executor)
        for mode in (c for _, _, c in configurations(args.blocks[:1], args.modes)):  # warm-up every code path
            lm.run([lm.request(sets["free"][0], 16, mode)])
        if args.pass_costs:
            for r in fused_pass_costs(lm, args.blocks, args.batches, max(args.repeats, 5)):
                costs.append({"executor": executor, **r})
                print(f"{executor:11s} c(T)/c(1) B={r['block']} N={r['batch']}: spec draft+verify "
                      f"{r['spec_draft_plus_verify']:.2f}, fused chain+sub-blocks {r['fused_chain_plus_subblocks']:.2f}",
                      flush=True)
        for set_name, prompts in sets.items():
            for batch in args.batches:
                ar_tps = None
                for mode_name, params, mode in configurations(args.blocks, args.modes):
                    m = run_one(lm, prompts, mode, batch, args.max_new_tokens, args.repeats)
                    ar_tps = ar_tps or m["tokens_per_s"]
                    label = mode_name + "".join(f" {k}={v}" for k, v in params.items())
                    row = {"executor": executor, "set": set_name, "batch": batch, "mode": mode_name, **params,
                           "label": label, **m, "speedup_vs_ar": m["tokens_per_s"] / ar_tps}
                    rows.append(row)
                    acc = row["mean_accepted_length"]
                    print(f"{executor:11s} {set_name:10s} b={batch} {label:28s} tok/fwd {m['tokens_per_forward']:5.2f}  "
                          f"acc {acc if acc is None else round(acc, 2)!s:5s} tok/s {m['tokens_per_s']:7.1f}  "
                          f"x{row['speedup_vs_ar']:4.2f}  distinct4 {m['distinct_4gram']:.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": Path(args.model).name, "executors": args.executor, "machine": platform.processor() or
            platform.machine(), "threads": args.threads, "prepack": args.prepack,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "command": " ".join(["scripts/bench.py", *sys.argv[1:]]), "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "num_prompts": {k: len(v) for k, v in sets.items()}}
    fused_vs_spec = [{"executor": f["executor"], "set": f["set"], "batch": f["batch"], "block": f["block"], "K": f["K"],
                      "tpf_ratio": f["tokens_per_forward"] / sp["tokens_per_forward"],
                      "tokens_per_s_ratio": f["tokens_per_s"] / sp["tokens_per_s"]}
                     for f in rows if f["mode"] == "fused_spec"
                     for sp in rows if sp["mode"] == "spec" and sp["lora"] and
                     all(sp[k] == f[k] for k in ("executor", "set", "batch", "block"))]
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "pass_costs": costs,
                                                  "fused_vs_spec": fused_vs_spec}, indent=1) + "\n")
    plot([r for r in rows if r["executor"] == args.executor[0]], out / "bench.png")
    summary = {"meta": meta, "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                                       if k != "sample"} for r in rows], "pass_costs": costs,
               "fused_vs_spec": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                                 for r in fused_vs_spec]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

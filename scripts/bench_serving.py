"""Serving benchmark through a real Triton server: tokens/s and latency percentiles (time to first token,
time per output token, inter-chunk gaps) vs concurrency, for AR and spec decoding.

    python scripts/bench_serving.py [--model DIR] [--modes ar,spec] [--concurrency 1,2,4,8,16] [--max-tokens 32]

Starts ``tritonserver`` on 127.0.0.1 with a repository written for ``--model`` (default: models/tiny-kjv when
present, else a random tiny checkpoint), or measures an already running server (``--grpc-url``). Each level
runs ``concurrency`` closed-loop clients (one gRPC stream each) until ``--requests`` requests are done.
Writes JSON and a PNG plot; the last stdout line is a JSON summary. Needs scripts/setup_triton_env.sh.

Definitions: TTFT = send to first token-bearing response; TPOT = (last token time - TTFT) / (tokens - 1) per
request; ITL = gap between consecutive token-bearing responses (a spec response may carry several tokens);
tokens/s = output tokens of the level / wall time of the level.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def choose_model(model: str | None, tmp: Path) -> tuple[str, str]:
    """(checkpoint path, label for the results) of a serving script's ``--model``: the given directory,
    models/tiny-kjv when it is None and present, else (or for "random") a random tiny checkpoint written to
    ``tmp``. The label is relative to the repository (no absolute paths of the machine in the results)."""
    if model is None and (ROOT / "models" / "tiny-kjv" / "config.json").exists():
        model = str(ROOT / "models" / "tiny-kjv")
    if model in (None, "random"):
        from trimode.runtime.model.checkpoint import write_random_checkpoint
        from trimode.runtime.model.config import tiny_config

        path = write_random_checkpoint(tmp / "random-tiny", tiny_config(), seed=0, lora_rank=4)
        return str(path), "random tiny_config() checkpoint"
    try:
        return model, str(Path(model).resolve().relative_to(ROOT))
    except ValueError:
        return model, Path(model).name


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    arr = np.asarray(values) * 1000.0
    return {"p50": round(float(np.percentile(arr, 50)), 3), "p90": round(float(np.percentile(arr, 90)), 3),
            "p99": round(float(np.percentile(arr, 99)), 3), "mean": round(float(arr.mean()), 3)}


def run_level(url: str, mode: str, concurrency: int, prompts: list[list[int]], max_tokens: int, num_requests: int,
              block_length: int | None, timeout: float) -> dict:
    from trimode.runtime.serving.client import StreamingClient

    lock = threading.Lock()
    todo = list(range(num_requests))
    results, errors = [], []
    clients = [StreamingClient(url) for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)

    def worker(c: StreamingClient) -> None:
        barrier.wait()
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            r = c.generate(input_ids=prompts[i % len(prompts)], max_tokens=max_tokens, mode=mode,
                           block_length=block_length if mode != "ar" else None, timeout=timeout)
            with lock:
                (errors if r.error else results).append(r.error or r)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in clients:
        c.close()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    tokens = sum(len(r.token_ids) for r in results)
    ttft = [r.ttft for r in results]
    tpot = [(r.latency - r.ttft) / (len(r.token_ids) - 1) for r in results if len(r.token_ids) > 1]
    itl = [b[0] - a[0] for r in results for a, b in zip(r.token_times, r.token_times[1:])]
    tpf = [r.counters.get("tokens_per_forward") for r in results if r.counters.get("tokens_per_forward")]
    acc = [r.counters["mean_accepted_length"] for r in results if r.counters.get("mean_accepted_length")]
    return {"mode": mode, "concurrency": concurrency, "requests": len(results), "output_tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "requests_per_s": round(len(results) / wall, 3), "ttft_ms": percentiles(ttft),
            "tpot_ms": percentiles(tpot), "itl_ms": percentiles(itl),
            "tokens_per_forward": round(statistics.mean(tpf), 4) if tpf else None,
            "mean_accepted_length": round(statistics.mean(acc), 4) if acc else None}


def plot(levels: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode in sorted({r["mode"] for r in levels}):
        rows = sorted((r for r in levels if r["mode"] == mode), key=lambda r: r["concurrency"])
        x = [r["concurrency"] for r in rows]
        axes[0].plot(x, [r["tokens_per_s"] for r in rows], "o-", label=mode)
        line, = axes[1].plot(x, [r["ttft_ms"]["p50"] for r in rows], "o-", label=f"{mode} p50")
        axes[1].plot(x, [r["ttft_ms"]["p90"] for r in rows], "s--", color=line.get_color(), label=f"{mode} p90")
        line, = axes[2].plot(x, [r["tpot_ms"]["p50"] for r in rows], "o-", label=f"{mode} TPOT p50")
        axes[2].plot(x, [r["itl_ms"]["p50"] for r in rows], "s--", color=line.get_color(), label=f"{mode} ITL p50")
    ticks = sorted({r["concurrency"] for r in levels})
    for ax, ylabel in zip(axes, ["output tokens/s", "time to first token (ms)", "ms"]):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("throughput")
    axes[1].set_title("TTFT")
    axes[2].set_title("per-token latency")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="checkpoint (default: models/tiny-kjv when present; 'random': a random tiny_config() one)")
    ap.add_argument("--grpc-url", default=None, help="measure this running server instead of starting one")
    ap.add_argument("--modes", default="ar,spec")
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default max(8, 2 x concurrency))")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--prompts", default=None, help="text file, one prompt per line, encoded with the checkpoint's "
                    "tokenizer and cut to --prompt-len tokens (default: random token ids)")
    ap.add_argument("--block-length", type=int, default=None, help="spec block length (default: checkpoint's)")
    ap.add_argument("--threads", type=int, default=1, help="the server runtime's CPU threads (default 1)")
    ap.add_argument("--num-pages", type=int, default=1024)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_serving.json"))
    args = ap.parse_args(argv)

    from trimode.runtime.model.checkpoint import load_config
    from trimode.runtime.serving.repository import write_repository
    from trimode.runtime.serving.server import TritonServer

    tmp = Path(tempfile.mkdtemp(prefix="trimode-bench-"))
    model, model_label = choose_model(args.model, tmp)
    cfg = load_config(model)
    rng = np.random.default_rng(args.seed)
    if args.prompts:
        from trimode.runtime.model.checkpoint import load_tokenizer

        tokenizer = load_tokenizer(model, cfg)
        if tokenizer is None:
            ap.error(f"--prompts needs a checkpoint with a tokenizer; {model} has none")
        lines = [ln.strip() for ln in Path(args.prompts).read_text(errors="replace").splitlines() if ln.strip()]
        encoded = [ids[:args.prompt_len] for ids in (tokenizer.encode(ln) for ln in lines)
                   if len(ids) >= max(1, args.prompt_len // 2)]
        if not encoded:
            ap.error(f"--prompts {args.prompts}: no line has {args.prompt_len // 2} tokens or more")
        prompts = [encoded[i] for i in rng.permutation(len(encoded))[:256]]
        prompt_label = f"{len(prompts)} text prompts from {Path(args.prompts).name}"
    else:
        low = 4 if cfg.vocab_size > 8 else 0
        prompts = [rng.integers(low, cfg.vocab_size, args.prompt_len).tolist() for _ in range(64)]
        prompt_label = "random token ids"
    modes = [m for m in args.modes.split(",") if m]
    levels = [int(c) for c in args.concurrency.split(",")]

    server = None
    url = args.grpc_url
    if url is None:
        repo = write_repository(tmp / "repo", model, num_pages=args.num_pages, page_size=args.page_size,
                                max_concurrent_requests=max(levels), threads=args.threads)
        server = TritonServer(repo)
        t0 = time.perf_counter()
        server.start()
        print(f"[bench] server ready in {time.perf_counter() - t0:.1f} s at {server.grpc_url}", file=sys.stderr)
        url = server.grpc_url
    rows = []
    try:
        for mode in modes:  # warm up each mode's code paths first
            run_level(url, mode, 2, prompts, args.max_tokens, 2, args.block_length, args.timeout)
        for mode in modes:
            for c in levels:
                n = args.requests or max(8, 2 * c)
                row = run_level(url, mode, c, prompts, args.max_tokens, n, args.block_length, args.timeout)
                rows.append(row)
                print(f"[bench] {mode:5s} c={c:2d}: {row['tokens_per_s']:8.1f} tok/s  TTFT p50 "
                      f"{row['ttft_ms']['p50']:8.1f} ms  TPOT p50 {row['tpot_ms']['p50']:7.2f} ms  "
                      f"tokens/forward {row['tokens_per_forward']}", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": model_label, "prompts": prompt_label, "config": {k: v for k, v in vars(args).items() if k not in ("out", "model", "prompts")},
              "server": "tritonserver 2.51 (nvidia-pytriton), Python backend, 1 CPU instance",
              "cpu_count": os.cpu_count(), "levels": rows}
    out.write_text(json.dumps(report, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot(rows, png, f"trimode via Triton (gRPC streaming), {model_label}, {prompt_label}, "
                    f"prompt={args.prompt_len} tokens, max_tokens={args.max_tokens}, threads={args.threads}")
    summary = {"json": str(out), "png": str(png),
               "tokens_per_s": {m: {r["concurrency"]: r["tokens_per_s"] for r in rows if r["mode"] == m}
                                for m in modes},
               "ttft_p50_ms": {m: {r["concurrency"]: r["ttft_ms"]["p50"] for r in rows if r["mode"] == m}
                               for m in modes}}
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

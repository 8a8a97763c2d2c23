"""Serving lifecycle probe through a real Triton server, as an operator would probe it: stopping with streams in
flight, a huge prompt beside a running stream, a burst against a small queue limit.

    python scripts/probe_serving.py [--model DIR|random] [--streams 1,8,32] [--huge-mb 10,30] [--burst 40]

- stop: for each N in ``--streams``, ``trimode serve`` with N long diffusion streams in flight and one idle open
  stream gets SIGTERM; measured: seconds until every stream has its final response, seconds until the launcher
  exits, its exit status and stop report, what each stream got, files left in /dev/shm and the temp dir;
- huge prompt: one AR stream runs; a ``text_input`` of each ``--huge-mb`` size is sent beside it; measured: how
  long the refusal took, the running stream's largest gap between responses while it was refused (and, for
  comparison, the largest gap of the same stream before the huge prompt was sent), the backend process's
  memory in MiB before and after (after one warm-up request): resident (VmRSS), of which its own heap
  (RssAnon), mapped files (RssFile) and the Python backend's shared-memory pool for request tensors
  (RssShmem), and its peak (VmHWM);
- burst: ``--burst`` small AR requests at once against ``--max-queued-requests 8`` with room in the batch and
  the pool: served vs "server busy".

Default model: models/tiny-kjv when present, else a random tiny checkpoint. Writes JSON (``--out``) and prints a
one-line JSON summary last. Needs scripts/setup_triton_env.sh.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _launch(model: str, *extra: str) -> tuple[subprocess.Popen, dict]:
    cmd = [sys.executable, "-m", "trimode.runtime.cli", "serve", "--model", model, "--threads", "1", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"trimode serve did not start (exit status {proc.wait()})")
    return proc, json.loads(line)


def _leftovers(serve_pid: int) -> list[str]:
    tmp = tempfile.gettempdir()
    return (glob.glob(f"/dev/shm/trimode_{serve_pid}_*") + glob.glob(os.path.join(tmp, f"trimode-*-{serve_pid}-*")))


def probe_stop(model: str, n: int, max_tokens: int, block: int) -> dict:
    """N diffusion streams in flight and one idle stream; SIGTERM to the launcher."""
    from trimode.runtime.serving.client import StreamingClient

    pages = n * ((max_tokens + 32) // 16 + 2) + 8
    proc, ready = _launch(model, "--num-pages", str(pages), "--page-size", "16", "--max-concurrent-requests",
                          str(max(n, 1)), "--max-tokens-limit", str(max_tokens))
    results: list = [None] * n
    done_at: list = [None] * n
    started = [threading.Event() for _ in range(n)]

    def run(i: int) -> None:
        with StreamingClient(ready["grpc"]) as c:
            results[i] = c.generate(input_ids=[5 + i % 50, 6, 7], max_tokens=max_tokens, mode="diffusion",
                                    block_length=block, timeout=300, on_chunk=lambda ids: started[i].set())
            done_at[i] = time.monotonic()
            started[i].set()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    idle = StreamingClient(ready["grpc"])
    for e in started:
        e.wait(120)
    t0 = time.monotonic()
    os.kill(ready["serve_pid"], signal.SIGTERM)
    for t in threads:
        t.join(120)
    streams_s = max((d or time.monotonic()) for d in done_at) - t0
    code = proc.wait(120)
    exit_s = time.monotonic() - t0
    rest = proc.stdout.read().strip().splitlines()
    idle.close()
    outcome: dict[str, int] = {}
    for r in results:
        key = "no answer" if r is None else (r.error or f"finished ({r.finish_reason})")
        outcome[key] = outcome.get(key, 0) + 1
    return {"streams": n, "max_tokens": max_tokens, "block_length": block,
            "all_streams_answered_s": round(streams_s, 3), "launcher_exit_s": round(exit_s, 3),
            "exit_status": code, "stop_report": json.loads(rest[-1])["stopped"] if rest else None,
            "stream_outcomes": outcome, "leftovers": _leftovers(ready["serve_pid"])}


def _mem(pid: int) -> dict:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def probe_huge_prompt(grpc_url: str, sizes_mb: list[int], max_tokens: int) -> list[dict]:
    """A huge text_input beside a running AR stream, once per size (a fresh stream each time)."""
    from trimode.runtime.serving.client import StreamingClient

    rows = []
    with StreamingClient(grpc_url) as c:
        stub = c.stats()["pid"]
        c.generate(input_ids=[5, 6, 7], max_tokens=max_tokens, mode="ar", timeout=300)  # warm: code paged in
    for mb in sizes_mb:
        times: list[float] = []
        runner = StreamingClient(grpc_url)
        runner.send(input_ids=[5, 6, 7], max_tokens=max_tokens, mode="ar")
        out = {}
        def receive(runner=runner, out=out, times=times) -> None:
            out["r"] = runner.receive(timeout=300, on_chunk=lambda ids: times.append(time.monotonic()))

        t = threading.Thread(target=receive)
        mem_before = _mem(stub)
        t.start()
        while len(times) < 20:
            time.sleep(0.005)
        text = "In the beginning " * (mb * 2**20 // 17)
        with StreamingClient(grpc_url) as c:
            sent = time.monotonic()
            r = c.generate(text_input=text, max_tokens=4, timeout=300)
            refused = time.monotonic()
        del text
        t.join(300)
        runner.close()
        mem_after = _mem(stub)
        gaps_during = [b - a for a, b in zip(times, times[1:]) if b >= sent and a <= refused + 0.05]
        gaps_before = [b - a for a, b in zip(times, times[1:]) if b < sent]
        rows.append({"text_input_mb": mb, "refused_in_s": round(refused - sent, 4), "error": (r.error or "")[:160],
                     "stream_tokens": len(out["r"].token_ids), "stream_error": out["r"].error,
                     "stream_largest_gap_during_ms": round(1000 * max(gaps_during), 2) if gaps_during else None,
                     "stream_largest_gap_before_ms": round(1000 * max(gaps_before), 2) if gaps_before else None,
                     "backend_mb_before": mem_before, "backend_mb_after": mem_after})
    return rows


def probe_burst(model: str, n: int, max_queued: int) -> dict:
    from trimode.runtime.serving.client import StreamingClient

    proc, ready = _launch(model, "--max-queued-requests", str(max_queued), "--max-concurrent-requests", "64",
                          "--num-pages", "1024", "--page-size", "16")
    try:
        clients = [StreamingClient(ready["grpc"]) for _ in range(n)]
        for c in clients:
            c.send(input_ids=[5, 6, 7], max_tokens=8, mode="ar")
        results = [c.receive(timeout=300) for c in clients]
        for c in clients:
            c.close()
    finally:
        os.kill(ready["serve_pid"], signal.SIGTERM)
        proc.wait(60)
    busy = sum(1 for r in results if r.error and "server busy" in r.error)
    return {"requests": n, "max_queued_requests": max_queued, "max_concurrent_requests": 64,
            "served": sum(1 for r in results if r.error is None), "busy": busy,
            "other_errors": sum(1 for r in results if r.error and "server busy" not in r.error)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: models/tiny-kjv when present; 'random')")
    ap.add_argument("--streams", default="1,8,32", help="streams in flight at the stop (one run each)")
    ap.add_argument("--max-tokens", type=int, default=480, help="tokens per stream (prompt + this <= positions)")
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--huge-mb", default="10,30", help="huge text_input sizes in MiB")
    ap.add_argument("--burst", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "results" / "probe_serving.json"))
    args = ap.parse_args(argv)

    from trimode.runtime.serving.client import StreamingClient  # noqa: F401  (needs tritonclient)
    from trimode.runtime.serving.repository import write_repository
    from trimode.runtime.serving.server import TritonServer

    from bench_serving import choose_model  # the sibling script (scripts/ is on sys.path when run as a script)

    tmp = Path(tempfile.mkdtemp(prefix="trimode-probe-"))
    model, label = choose_model(args.model, tmp)
    report: dict = {"model": label, "cpu_count": os.cpu_count(), "stop": [], "huge_prompt": [], "burst": None}
    for n in [int(x) for x in args.streams.split(",") if x]:
        row = probe_stop(model, n, args.max_tokens, args.block_length)
        report["stop"].append(row)
        print(f"[probe] stop with {n} streams: all answered in {row['all_streams_answered_s']} s, launcher exit "
              f"{row['exit_status']} in {row['launcher_exit_s']} s, {row['stream_outcomes']}", file=sys.stderr)
    repo = write_repository(tmp / "repo", model, num_pages=1024, page_size=16, threads=1, default_mode="ar")
    with TritonServer(repo) as server:
        report["huge_prompt"] = probe_huge_prompt(server.grpc_url, [int(x) for x in args.huge_mb.split(",") if x],
                                                  args.max_tokens)
    for row in report["huge_prompt"]:
        print(f"[probe] huge prompt {row['text_input_mb']} MiB: refused in {row['refused_in_s']} s, stream gap "
              f"{row['stream_largest_gap_during_ms']} ms (before: {row['stream_largest_gap_before_ms']} ms), "
              f"backend {row['backend_mb_before']} -> {row['backend_mb_after']} MiB", file=sys.stderr)
    report["burst"] = probe_burst(model, args.burst, 8)
    print(f"[probe] burst: {report['burst']}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"json": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
                      "stop_s": {r["streams"]: r["all_streams_answered_s"] for r in report["stop"]},
                      "exit_status": {r["streams"]: r["exit_status"] for r in report["stop"]},
                      "huge_gap_ms": {r["text_input_mb"]: r["stream_largest_gap_during_ms"]
                                      for r in report["huge_prompt"]},
                      "burst": report["burst"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Resident memory of the onnxruntime executor with 1 engine kind loaded vs all of them (weights shared).

    python scripts/engine_memory.py --engine engines/tiny-kjv

Each measurement runs in a fresh process: the process's RSS after creating the executor and running one
forward of every loaded kind, and that minus the RSS before the executor (torch, onnxruntime and the KV pool
already loaded). With shared initializers the weights count once; each extra session adds onnxruntime's own
per-session state (about 1.3 MiB for the tiny model's ~200-node graphs). The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(engine: str, kinds: list[str]) -> tuple[float, float]:
    import torch

    from trimode.runtime.executors.engine_dir import read_manifest
    from trimode.runtime.kv_cache import PagedKVCache
    from trimode.runtime.executors.onnx_executor import OnnxRuntimeExecutor
    from trimode.runtime.passes import PassKind, SeqPass

    torch.set_num_threads(1)
    s = read_manifest(engine)["shapes"]
    cache = PagedKVCache(s["num_layers"], s["num_kv_heads"], s["head_dim"], 64, s["page_size"])
    import onnxruntime  # noqa: F401  (loaded before the baseline: the library itself is not counted)

    base = _rss_mb()
    ex = OnnxRuntimeExecutor(engine, cache, kinds=kinds, threads=1)
    cache.add_sequence(0)
    cache.reserve(0, 40)
    kind_pass = {"prefill": (PassKind.PREFILL, 16), "decode": (PassKind.DECODE, 1), "verify": (PassKind.VERIFY, 8),
                 "draft": (PassKind.DRAFT, 8)}
    for kind in kinds:  # one forward per kind at position 16 (prefill first fills positions 0..15)
        pk, n = kind_pass[kind]
        start = 0 if kind == "prefill" else 16
        ex.forward([SeqPass(0, pk, tuple(range(4, 4 + n)), start, 1)])
    return _rss_mb(), _rss_mb() - base


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="engine_memory.py", description=__doc__.split("\n")[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--kinds", help=argparse.SUPPRESS)  # internal: one measurement in this process
    a = p.parse_args(argv)
    if a.kinds:
        print(json.dumps(measure(a.engine, a.kinds.split(","))))
        return 0
    from trimode.runtime.executors.engine_dir import read_manifest

    m = read_manifest(a.engine)
    weights_mb = m["files"]["onnx/weights.bin"]["bytes"] / 2**20
    kinds = list(m["engine_kinds"])
    total, delta = {}, {}
    for label, ks in (("1 kind", kinds[:1]), (f"{len(kinds)} kinds", kinds)):
        out = subprocess.run([sys.executable, __file__, "--engine", a.engine, "--kinds", ",".join(ks)],
                             capture_output=True, text=True, check=True)
        total[label], delta[label] = (round(x, 1) for x in json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{label:8s} ({', '.join(ks)}): process RSS {total[label]} MiB, executor +{delta[label]} MiB "
              f"(weights.bin {weights_mb:.1f} MiB)")
    one, all_ = "1 kind", f"{len(kinds)} kinds"
    print(json.dumps({"engine": a.engine, "weights_mib": round(weights_mb, 1), "rss_mib": total,
                      "executor_mib": delta, "rss_ratio": round(total[all_] / total[one], 3),
                      "executor_ratio": round(delta[all_] / delta[one], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TensorRT-RTX build times and plan sizes per engine kind, recipe and target, on this machine (no GPU needed).

    python scripts/bench_trt_build.py engines/tiny-kjv-none engines/tiny-kjv-w4a16 ...   # --target spark builds

For each engine directory (built with ``scripts/build_engine.py --target spark``; its recipe is read from the
manifest) the TensorRT stage is rebuilt into a scratch directory: ``per-kind`` (one plan per kind: seconds and
bytes each) and ``shared`` (one plan, one profile per kind), for ``--target spark`` and ``--target rtx`` (FP8
recipes are refused for ``rtx``, and reported so). Each build runs in a child process (as in every build); the
per-plan seconds are measured there around parsing and ``build_serialized_network``, so they are the builder's
alone (no interpreter start-up). Prints a Markdown table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from trimode.build.trt_compile import EngineBuildError, build_engines
from trimode.runtime.executors.engine_dir import read_manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("engine_dirs", nargs="+", type=Path)
    p.add_argument("--targets", default="spark,rtx")
    a = p.parse_args(argv)
    rows, out = [], []
    for engine_dir in a.engine_dirs:
        m = read_manifest(engine_dir)
        recipe, kinds, shapes = m["recipe"]["name"], list(m["engine_kinds"]), m["shapes"]
        for target in a.targets.split(","):
            for layout in ("per-kind", "shared"):
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    try:
                        section = build_engines(engine_dir / "onnx", Path(tmp), kinds, shapes, shapes["num_layers"],
                                                layout, target=target, recipe=recipe)
                    except EngineBuildError as e:
                        rows.append(f"| {recipe} | {target} | {layout} | refused | {str(e).split(': ', 1)[-1][:90]} |")
                        out.append({"recipe": recipe, "target": target, "layout": layout, "refused": str(e)})
                        break
                    total = time.perf_counter() - t0
                for plan, entry in section["plans"].items():
                    rows.append(f"| {recipe} | {target} | {layout} | {Path(plan).stem} | {entry['seconds']:.2f} s, "
                                f"{entry['bytes'] / 2**20:.1f} MiB |")
                out.append({"recipe": recipe, "target": target, "layout": layout, "seconds": round(total, 2),
                            "plans": section["plans"]})
    print("| recipe | target | layout | plan | build time, size |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

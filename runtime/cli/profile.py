"""``trimode profile``: the pass-cost profile (runtime/profiling.py) of a checkpoint or an engine directory on this
machine, written as ``profile.json`` and ``profile.png``.

    trimode profile --model DIR [--device cuda] [--out DIR] [--save]   (--save: pass_costs.<executor>.json beside
                                                                       the model, read by mode auto)
    trimode profile --engine DIR [--executor onnxruntime|torch] [--prepack] [--tokens 1 2 4 ...] [--batches 1 4 16]

Prints one table per batch size (median ms per forward and c(T)/c(1) by pass kind and T) and the host share
of each mode's steps; the last stdout line is a JSON summary (c(16)/c(1) per batch and kind, host shares).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trimode.runtime import profiling, settings
from trimode.runtime.scheduling import COSTS_FILE, REQUIRED_KINDS

PROFILE_SETTINGS = ("num_pages", "kernels", "dtype", "threads")


def add_subparsers(sub) -> None:
    """Register ``profile`` on an ``add_subparsers()`` object (it sets ``handler``)."""
    p = sub.add_parser("profile", help="time forwards of T tokens per sequence by pass kind and batch; host share "
                       "per mode (JSON + PNG)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (torch executor)")
    src.add_argument("--engine", help="engine directory (scripts/build_engine.py --out)")
    p.add_argument("--executor", choices=["onnxruntime", "torch"], default="onnxruntime",
                   help="with --engine: the reference graphs (onnxruntime, default) or the engine's checkpoint (torch)")
    p.add_argument("--prepack", action="store_true",
                   help="with --engine and onnxruntime: each graph's session keeps a prepacked copy of the weights")
    p.add_argument("--device", default="cpu", help="with --model: cpu or cuda[:N] (default cpu)")
    p.add_argument("--tokens", type=settings.positive_int("--tokens"), nargs="+", default=list(profiling.TOKEN_COUNTS),
                   help="tokens per sequence T (default 1 2 4 8 16 32 64)")
    p.add_argument("--batches", type=settings.positive_int("--batches"), nargs="+", default=list(profiling.BATCH_SIZES),
                   help="sequences per forward (default 1 4 16)")
    p.add_argument("--kinds", choices=profiling.PASS_KINDS, nargs="+", default=list(profiling.PASS_KINDS),
                   help="pass kinds (default: all; decode is timed at T = 1)")
    p.add_argument("--context-len", type=settings.positive_int("--context-len"), default=64,
                   help="committed prefix of every sequence, in tokens (default 64)")
    p.add_argument("--repeats", type=settings.positive_int("--repeats"), default=20,
                   help="timed forwards per point (median)")
    p.add_argument("--host-modes", choices=profiling.MODES, nargs="*", default=list(profiling.MODES),
                   help="modes whose host time per step is measured (default all; none: skip)")
    p.add_argument("--host-batches", type=settings.positive_int("--host-batches"), nargs="+", default=[1, 4])
    p.add_argument("--host-tokens", type=settings.positive_int("--host-tokens"), default=32,
                   help="new tokens per request in the host-time runs (default 32)")
    p.add_argument("--block-length", type=settings.positive_int("--block-length"), default=None,
                   help="block length of the diffusion and spec host-time runs (default: the engine directory's, else the model's block_size)")
    p.add_argument("--out", default="results/profile", help="output directory (profile.json, profile.png)")
    p.add_argument("--save", action="store_true",
                   help="also store the costs beside the model or engine (pass_costs.<executor>.json), where mode "
                        "auto reads them")
    settings.add_arguments(p, names=PROFILE_SETTINGS, unset=True)
    p.set_defaults(handler=profile_command)


def load(args: argparse.Namespace):
    """(TriModeLM, source label, executor name) of the parsed ``profile`` arguments."""
    from trimode.runtime.api import TriModeLM

    runtime_settings = settings.from_args(args, PROFILE_SETTINGS)
    if args.engine:
        extra = {"prepack": True} if args.prepack and args.executor == "onnxruntime" else {}
        return (TriModeLM.from_engine(args.engine, executor=args.executor, settings=runtime_settings, **extra),
                f"engine {Path(args.engine).name}" + (" (prepacked)" if extra else ""), args.executor)
    return (TriModeLM.from_pretrained(args.model, device=args.device, settings=runtime_settings),
            f"checkpoint {Path(args.model).name}", "torch")


def profile_command(args: argparse.Namespace) -> int:
    lm, source, executor = load(args)
    result = profiling.profile(lm, source, executor, args.tokens, args.batches, args.kinds, args.context_len,
                               args.repeats, args.host_modes, args.host_batches, args.host_tokens, args.block_length)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.save:
        missing = [k for k in REQUIRED_KINDS if k not in args.kinds]
        if missing:
            print(f"trimode: error: --save needs the pass kinds mode auto looks up; add {missing} to --kinds",
                  file=sys.stderr)
            return 2
        beside = Path(args.engine or args.model) / COSTS_FILE.format(executor=executor)
        beside.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {beside} (mode auto's pass costs for the {executor} executor)", file=sys.stderr)
    drawn = profiling.plot(result, out / "profile.png")
    print("\n".join(profiling.summary_lines(result)))
    print(f"wrote {out / 'profile.json'}" + (f" and {out / 'profile.png'}" if drawn else
                                             " (no plot: matplotlib is not installed; pip install trimode[bench])"),
          file=sys.stderr)
    summary = {"source": source, "executor": executor, "device": result["meta"]["device"],
               "c16_over_c1": {b: {k: round(v["16"], 3) for k, v in kinds.items() if "16" in v}
                               for b, kinds in result["ratios"].items()},
               "host_share": {f"{h['mode']} b{h['batch']}": round(h["host_share"], 3) for h in result["host"]}}
    print(json.dumps(summary))
    return 0

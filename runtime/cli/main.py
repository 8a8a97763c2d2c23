"""The ``trimode`` command line.

    trimode generate --model DIR --mode {ar,diffusion,spec,fused_spec,auto} [options] PROMPT
    trimode generate --model DIR --chat [--system TEXT] [--stop TEXT] [--max-thinking-tokens N] PROMPT
    trimode generate --engine DIR [--executor auto|tensorrt|onnxruntime|torch] ...   (an engine directory)
    trimode triton-repo --model DIR --out REPO      (runtime/cli/serve.py)
    trimode serve --repo REPO | --model DIR         (runtime/cli/serve.py)
    trimode serve-openai --model DIR | --engine DIR (runtime/cli/serve_openai.py: OpenAI-compatible HTTP)
    trimode profile --model DIR | --engine DIR      (runtime/cli/profile.py: pass costs, JSON + PNG)

Streams the text as tokens are accepted, then prints the counters (forwards by kind, tokens per forward,
accepted lengths, tokens/s). Bad arguments exit with status 2 and a message naming the argument.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from trimode.runtime import settings
from trimode.runtime.cli.profile import add_subparsers as add_profile
from trimode.runtime.cli.serve import add_subparsers as add_serving
from trimode.runtime.cli.serve_openai import add_subparsers as add_openai
from trimode.runtime.cli.serve_openai import add_source_arguments, load_lm
from trimode.runtime.cli.tensor_parallel import add_tp_arguments, generate_tensor_parallel
from trimode.runtime.executors.engine_dir import EngineDirError
from trimode.runtime.kv_cache import KVCacheExhausted
from trimode.runtime.model.hf_format import CheckpointError
from trimode.runtime.request import Mode, ModeConfig, RequestError, mode_config
from trimode.runtime.sampling import SamplingError
from trimode.runtime.serving.server import ServingError
from trimode.runtime.stopping import OutputAssembler

MODES = [m.value for m in Mode]


def _unit_float(name: str, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
        if not ok:
            raise argparse.ArgumentTypeError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
        return value
    return parse


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--temperature must be a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"--temperature must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trimode", description="Tri-mode LM runtime: AR, block diffusion, "
                                     "self-speculation over one KV cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt", help="the prompt text")
    add_source_arguments(g)  # --model | --engine, --executor (what load_lm reads)
    g.add_argument("--mode", choices=MODES, default="spec", help="decoding mode (default: spec)")
    g.add_argument("--max-new-tokens", type=settings.positive_int("--max-new-tokens"), default=64)
    g.add_argument("--block-length", type=settings.positive_int("--block-length"), default=None,
                   help="block length for diffusion and spec (default: the engine directory's, else the "
                        "checkpoint's block_size)")
    g.add_argument("--threshold", type=_unit_float("--threshold"), default=None,
                   help="confidence threshold (diffusion default 0.9; spec default 0 = one draft pass)")
    g.add_argument("--policy", choices=["threshold", "topk", "leftmost"], default=None,
                   help="diffusion unmasking policy (default threshold)")
    g.add_argument("--max-steps", type=settings.positive_int("--max-steps"), default=None,
                   help="diffusion: denoising passes per block (default: block length)")
    g.add_argument("--no-lora", action="store_true", help="spec: draft without the linear_spec_lora adapter")
    g.add_argument("--num-subblocks", type=settings.positive_int("--num-subblocks"), default=None,
                   help="fused_spec: sub-blocks drafted per step (default 4)")
    g.add_argument("--subblock-length", type=settings.positive_int("--subblock-length"), default=None,
                   help="fused_spec: tokens per sub-block, the next chain's length (default block length / 2)")
    g.add_argument("--temperature", type=_temperature, default=0.0)
    g.add_argument("--top-k", type=settings.positive_int("--top-k"), default=None)
    g.add_argument("--top-p", type=_unit_float("--top-p", low_open=True), default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true",
                   help="the prompt is a user message: render it with the checkpoint's chat template")
    g.add_argument("--system", default=None, help="with --chat: a system message before the user's")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable): the output ends before its first occurrence")
    g.add_argument("--max-thinking-tokens", type=settings.positive_int("--max-thinking-tokens", 0), default=None,
                   help="thinking budget: force the end-of-thinking token after this many tokens without it")
    g.add_argument("--end-think-token-id", type=settings.positive_int("--end-think-token-id", 0), default=None,
                   help="the end-of-thinking token id (default: config.json's end_think_token_id, else the "
                        "tokenizer's </think>)")
    # the runtime's sizes, kernels and dtype: options derived from runtime.settings (one table for CLI and Triton)
    settings.add_arguments(g, names=settings.GENERATE_OPTIONS, unset=True)
    g.add_argument("--json", action="store_true", help="print the counters as one JSON line")
    add_tp_arguments(g)  # --tp N, --tp-backend {auto,gloo,nccl}, --tp-timeout S
    add_serving(sub)  # triton-repo, serve
    add_openai(sub)  # serve-openai (runtime/cli/serve_openai.py)
    add_profile(sub)  # profile (runtime/cli/profile.py)
    return parser


# options that apply only to some modes: given with another mode they are refused, not silently ignored
_MODE_OPTIONS = {"threshold": ("diffusion", "spec"), "policy": ("diffusion",), "max_steps": ("diffusion",),
                 "no_lora": ("spec", "fused_spec", "auto"), "num_subblocks": ("fused_spec",),
                 "subblock_length": ("fused_spec",)}  # (--block-length is harmless for AR: not refused)


def _mode_config(args: argparse.Namespace, block_size: int) -> ModeConfig:
    for name, modes in _MODE_OPTIONS.items():
        if getattr(args, name) not in (None, False) and args.mode not in modes:
            raise ValueError(f"--{name.replace('_', '-')} applies to --mode {' / '.join(modes)}, not {args.mode}")
    policy = args.policy or "threshold"
    if args.mode == "diffusion" and policy != "threshold" and args.threshold is not None:
        raise ValueError("--threshold applies only to --policy threshold")
    return mode_config(args.mode, block_size, args.block_length, args.threshold, policy, args.max_steps,
                       use_lora=not args.no_lora, num_subblocks=args.num_subblocks,
                       subblock_length=args.subblock_length)


def generate(args: argparse.Namespace, lm=None) -> int:
    """Generate from args.prompt with ``lm`` (None: ``--model`` / ``--engine`` through ``load_lm``; rank 0's shard
    under --tp)."""
    if lm is None:
        try:
            lm = load_lm(args)  # as trimode serve-openai loads it
        except (EngineDirError, CheckpointError) as e:
            print(f"trimode: error: {'--engine' if args.engine else '--model'}: {e}", file=sys.stderr)
            return 2
    if lm.tokenizer is None:
        print(f"trimode: error: {args.engine or args.model} has no tokenizer.json; text prompts need one",
              file=sys.stderr)
        return 2
    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat")
    prompt = args.prompt
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
            [{"role": "user", "content": args.prompt}]
    request = lm.request(prompt, args.max_new_tokens, _mode_config(args, lm.default_block_length),
                         temperature=args.temperature, top_k=args.top_k or 0, top_p=args.top_p, seed=args.seed,
                         stop=args.stop, max_thinking_tokens=args.max_thinking_tokens,
                         end_think_token_id=args.end_think_token_id)
    stream = OutputAssembler(lm.tokenizer, request.stop)  # what is printed: stop strings never shown

    def on_tokens(_: int, ids: list[int]) -> None:
        stream.push(ids)
        if not args.json:
            sys.stdout.write(stream.take()[0])
            sys.stdout.flush()

    start = time.perf_counter()
    try:
        result = lm.run([request], on_tokens)[0]
    except KVCacheExhausted as e:  # the pool ran out mid-way (e.g. a block pass beside the prompt): say so, no trace
        print("" if args.json else "\n", end="")
        print(f"trimode: error: {e}; raise --num-pages", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    if not args.json:
        sys.stdout.write(stream.finish()[0])
    counters = {"mode": args.mode, **result.counters(), "tokens_per_s": round(len(result.token_ids) / elapsed, 2)}
    if args.json:
        print(json.dumps({"text": result.text, **counters}))
    else:
        print()
        names = {"verify": "fused steps"} if args.mode == "fused_spec" else {}  # a fused step is one verify forward
        print(f"[{args.mode}] {counters['num_tokens']} tokens, {counters['num_forwards']} forwards "
              f"({', '.join(f'{names.get(k, k)} {v}' for k, v in counters['forwards'].items() if v)}), "
              f"{counters['tokens_per_forward']:.2f} tokens/forward, {counters['tokens_per_s']:.1f} tokens/s"
              + (f", mean accepted length {counters['mean_accepted_length']:.2f}"
                 if counters['mean_accepted_length'] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "handler"):
            return args.handler(args)
        if args.command == "generate":
            if args.tp > 1:
                return generate_tensor_parallel(args, generate)
            return generate(args)
    except (RequestError, SamplingError, ServingError, ValueError) as e:
        sub = next((a for a in parser._subparsers._group_actions if a.dest == "command"), None) \
            if parser._subparsers is not None else None
        (sub.choices.get(args.command, parser) if sub is not None else parser).error(str(e))  # its own usage
    return 1


if __name__ == "__main__":
    sys.exit(main())

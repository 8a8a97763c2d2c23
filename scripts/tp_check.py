#!/usr/bin/env python3
"""Tensor-parallel check: one fixed greedy workload in every mode over N ranks, compared with one process.

    mpiexec -n 2 python scripts/tp_check.py --model DIR --tp 2 --reference          # CPU ranks (gloo)
    mpiexec -n 2 python scripts/tp_check.py --model DIR --tp 2 --reference --dtype bfloat16   # GPUs (nccl)
    torchrun --nproc-per-node 2 scripts/tp_check.py --model DIR --tp 2 --reference

Rank 0 ends with one JSON line: per mode the requests' token ids and counters, every rank's KV pool size
(``kv_pool_numel``), and with ``--reference`` the same workload run by rank 0 alone on the whole model
afterwards, the largest logit difference of one dense forward (drafter LoRA on) and ``match`` (token ids
and counters equal in every mode). ``--kill-rank R --kill-after K`` makes rank R kill itself (or, with
``--kill-signal STOP``, freeze; with ``--kill-signal EXIT``, end at once through ``os._exit(1)``: no teardown,
the kernel closes its sockets) after K forwards, to check that the other ranks stop with an error within
the collective timeout. Under MPICH's ``mpiexec`` (Hydra) use ``EXIT``: Hydra's proxy sends SIGKILL to every
rank as soon as one is reaped after dying of a signal, even with ``-disable-auto-cleanup``, so the others
would race the launcher instead of noticing the dead peer themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Callable


def workload(lm, prompts: list[list[int]], max_new_tokens: int, block: int) -> dict[str, list[dict]]:
    from trimode.runtime.request import ARConfig, DiffusionConfig, FusedSpecConfig, SpecConfig

    fused = FusedSpecConfig(block, min(2, block), min(2, block)) if block >= 2 else None
    modes = {
        "ar": [ARConfig()] * len(prompts),
        "diffusion": [DiffusionConfig(block, "threshold", 0.9)] * len(prompts),
        "diffusion-topk": [DiffusionConfig(block, "topk", None, max_steps=2)] * len(prompts),
        "spec": [SpecConfig(block, 0.0, use_lora=True)] * len(prompts),
        # fused spec: a sequence's chain and sub-blocks in one forward, broadcast to every rank together
        **({"fused_spec": [fused] * len(prompts)} if fused else {}),
        "mixed": [[ARConfig(), DiffusionConfig(block), SpecConfig(block), fused or ARConfig()][i % 4]
                  for i in range(len(prompts))],
    }
    out = {}
    for name, configs in modes.items():
        requests = [lm.request(p, max_new_tokens, mode) for p, mode in zip(prompts, configs)]
        out[name] = [{"token_ids": r.token_ids, "forwards": r.forwards, "accepted_lengths": r.accepted_lengths,
                      "revealed_per_step": r.revealed_per_step} for r in lm.run(requests)]
    return out


def dense_logits(model, vocab: int, seed: int):
    """One cache-free forward with the drafter LoRA on every token and a bidirectional mask."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (2, 11), generator=gen).to(next(model.parameters()).device)
    positions = torch.arange(11, device=ids.device).expand(2, 11)
    with torch.no_grad():
        return model.forward_dense(ids, positions, torch.ones(11, 11, dtype=torch.bool, device=ids.device),
                                   torch.ones(2, 11, device=ids.device)).float().cpu()


def killer(rank: int, args) -> Callable[[int], None]:
    def on_step(num_steps: int) -> None:
        if rank == args.kill_rank and num_steps == args.kill_after:
            if args.kill_signal == "EXIT":
                print(f"tp_check: rank {rank}: exiting abruptly after {num_steps} forwards", file=sys.stderr,
                      flush=True)
                os._exit(1)
            print(f"tp_check: rank {rank}: sending myself SIG{args.kill_signal} after {num_steps} forwards",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), getattr(signal, f"SIG{args.kill_signal}"))
    return on_step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    ap.add_argument("--timeout", type=float, default=60.0, help="collective timeout in seconds")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompt-lengths", default="5,11,3", help="comma-separated lengths of random prompts")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--block-length", type=int, default=4)
    ap.add_argument("--num-pages", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=4)
    ap.add_argument("--reference", action="store_true", help="rank 0 also runs the workload alone, then compares")
    ap.add_argument("--kill-rank", type=int, default=None)
    ap.add_argument("--kill-after", type=int, default=2, help="forwards before --kill-rank dies")
    ap.add_argument("--kill-signal", default="KILL", choices=["KILL", "STOP", "EXIT"],
                    help="how --kill-rank dies: SIGKILL, SIGSTOP (frozen) or os._exit(1) (EXIT)")
    args = ap.parse_args()

    import torch

    from trimode.runtime.api import TriModeLM
    from trimode.runtime.model.checkpoint import load_config
    from trimode.runtime.parallel.comm import TensorParallelError, init_tensor_parallel

    cfg = load_config(args.model)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, cfg.vocab_size, (int(n),), generator=gen).tolist()
               for n in args.prompt_lengths.split(",")]
    report: dict = {"tp": args.tp}
    start = time.perf_counter()
    comm = init_tensor_parallel(args.tp, args.backend, args.timeout)
    try:
        loaded = TriModeLM.from_pretrained(args.model, dtype=args.dtype, comm=comm, num_pages=args.num_pages,
                                           page_size=args.page_size)
        model = loaded.model
        tp_logits = dense_logits(model, cfg.vocab_size, seed=1)
        pool = loaded.cache.k_pool.numel() + loaded.cache.v_pool.numel()
        report["kv_pool_numel"] = [v[0] for v in comm.all_gather_ints([pool])]
        report["kv_pool_shape"] = list(loaded.cache.k_pool.shape)
        on_step = killer(comm.rank, args) if args.kill_rank is not None else None
        if not comm.is_leader:
            loaded.serve(on_step)
            comm.close()
            return 0
        if on_step is not None:
            forward, count = loaded.executor.forward, [0]

            def forward_then_hook(passes):
                outputs = forward(passes)
                count[0] += 1
                on_step(count[0])
                return outputs
            loaded.executor.forward = forward_then_hook
        report["device"] = str(comm.device)
        report["modes"] = workload(loaded, prompts, args.max_new_tokens, args.block_length)
        loaded.executor.close()
    except TensorParallelError as e:
        print(f"tp_check: rank {comm.rank}: error: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    comm.close()
    report["tp_seconds"] = round(time.perf_counter() - start, 3)
    if args.reference:
        ref = TriModeLM.from_pretrained(args.model, dtype=args.dtype, device=str(comm.device),
                                        num_pages=args.num_pages, page_size=args.page_size)
        report["reference"] = {"modes": workload(ref, prompts, args.max_new_tokens, args.block_length),
                               "kv_pool_numel": ref.cache.k_pool.numel() + ref.cache.v_pool.numel()}
        report["max_logit_diff"] = (tp_logits - dense_logits(ref.model, cfg.vocab_size, seed=1)).abs().max().item()
        report["match"] = report["modes"] == report["reference"]["modes"]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the trimode.plugins Triton kernels on a GPU against their torch references; paged attention also
against torch's scaled_dot_product_attention on equal shapes (K/V already gathered into dense tensors).

Shapes are an 8B model's (Hq 32, Hkv 8, head dim 128, bf16, vocabulary 131072): decode (T = 1) and blocks
(T = 16, 32; causal verify and block-bidirectional draft) over contexts of 1k-8k tokens in pages of 16/64, batch
1-64. Each case is also checked against the reference (max error). Printed per case: kernel and SDPA time (median
of CUDA-graph replays with L2 flushed, so no host launch overhead; attention also eager, ``eager_us``), the torch
reference's eager time (triton.testing.do_bench), achieved GB/s (bytes the op must move / time) and its fraction
of the card's measured device-to-device copy bandwidth. The last line is JSON. Without a CUDA GPU it says so and
exits 0 (``--dry-run`` runs tiny shapes on CPU in Triton's interpreter, to test the script itself).

    python scripts/bench_kernels.py            # the full set, about 1-2 minutes on an H100
    python scripts/bench_kernels.py --quick    # a few shapes
Exit status 1 if a kernel disagrees with its reference.
"""

import argparse
import datetime
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

HQ, HKV, D, VOCAB, MASK = 32, 8, 128, 131072, 3
DTYPE = torch.bfloat16
DEV = "cuda"
DRY_RUN = False  # --dry-run: tiny shapes on CPU under TRITON_INTERPRET=1, to test this script without a GPU


def do_bench(fn) -> float:
    """Median microseconds of fn, eager (host overhead included when the GPU waits for it), L2 flushed."""
    if DRY_RUN:
        t = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t)
    from triton.testing import do_bench as triton_bench
    return 1e3 * triton_bench(fn, warmup=10, rep=60, return_mode="median")


def gpu_time(fn, reps: int = 25) -> float:
    """Median microseconds of fn replayed from a CUDA graph (no host overhead), L2 flushed before each replay
    (the flush's own time subtracted). Falls back to ``do_bench`` if fn cannot be captured."""
    if DRY_RUN:
        return do_bench(fn)
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (and compile) outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    try:
        graphs = {"both": torch.cuda.CUDAGraph(), "flush": torch.cuda.CUDAGraph()}
        with torch.cuda.graph(graphs["both"]):
            flush.zero_()
            fn()
        with torch.cuda.graph(graphs["flush"]):
            flush.zero_()
    except Exception:
        torch.cuda.synchronize()
        return do_bench(fn)
    medians = {}
    for key, graph in graphs.items():
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        medians[key] = sorted(times)[reps // 2]
    return max(medians["both"] - medians["flush"], 1e-3)


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB: (read + write bytes) / time."""
    src = torch.empty(2 ** (20 if DRY_RUN else 30), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    us = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6) / 1e9


def attention_inputs(batch, context, num_new, page_size, gen):
    pages_per_seq = -(-(context + num_new) // page_size)
    num_pages = batch * pages_per_seq + 1
    k_pool = torch.randn(num_pages, page_size, HKV, D, device=DEV, dtype=DTYPE, generator=gen)
    v_pool = torch.randn_like(k_pool)
    perm = torch.randperm(num_pages, device=DEV, generator=gen)[:batch * pages_per_seq]
    block_tables = perm.view(batch, pages_per_seq).int().contiguous()  # scattered pages
    q = torch.randn(batch * num_new, HQ, D, device=DEV, dtype=DTYPE, generator=gen)
    k_new, v_new = (torch.randn(batch * num_new, HKV, D, device=DEV, dtype=DTYPE, generator=gen)
                    for _ in range(2))
    context_lens = torch.full((batch,), context, dtype=torch.int32, device=DEV)
    query_start = torch.arange(0, batch * num_new + 1, num_new, dtype=torch.int32, device=DEV)
    return q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start


def dense_for_sdpa(args, batch, context, num_new, page_size):
    """The same problem as dense [B, H, S, D] tensors (gathered outside the timing)."""
    q, k_new, v_new, k_pool, v_pool, block_tables, _, _ = args
    pos = torch.arange(context, device=DEV)
    slots = block_tables.long()[:, pos // page_size] * page_size + pos % page_size  # [B, L]
    k = torch.cat([k_pool.flatten(0, 1)[slots], k_new.view(batch, num_new, HKV, D)], 1).transpose(1, 2)
    v = torch.cat([v_pool.flatten(0, 1)[slots], v_new.view(batch, num_new, HKV, D)], 1).transpose(1, 2)
    return q.view(batch, num_new, HQ, D).transpose(1, 2), k.contiguous(), v.contiguous()


def bench_attention(batch, context, num_new, page_size, is_causal, copy_gbps, gen):
    from trimode.plugins.paged_attention import paged_attention_reference, paged_attention_triton
    args = attention_inputs(batch, context, num_new, page_size, gen)
    scale = D ** -0.5
    hints = dict(max_query_len=num_new, max_context_len=context)
    kernel = lambda: paged_attention_triton(*args, is_causal, scale, page_size, **hints)  # noqa: E731
    got = kernel()
    want = paged_attention_reference(*args, is_causal, scale, page_size)
    err = (got.float() - want.float()).abs().max().item()
    q, k, v = dense_for_sdpa(args, batch, context, num_new, page_size)
    mask = None
    if is_causal and num_new > 1:  # query i sees keys < L + i + 1 (bottom-right aligned)
        keys, queries = torch.arange(context + num_new, device=DEV), torch.arange(num_new, device=DEV)
        mask = keys[None, :] <= context + queries[:, None]
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)  # noqa: E731
    sdpa_err = (sdpa().transpose(1, 2).reshape(got.shape).float() - want.float()).abs().max().item()
    t_kernel, t_sdpa = gpu_time(kernel), gpu_time(sdpa)
    t_eager = do_bench(kernel)
    t_ref = do_bench(lambda: paged_attention_reference(*args, is_causal, scale, page_size))
    elt = torch.finfo(DTYPE).bits // 8
    moved = batch * (context + num_new) * HKV * D * 2 * elt + 2 * batch * num_new * HQ * D * elt
    gbps = moved / (t_kernel * 1e-6) / 1e9
    return dict(op="paged_attention", shape=dict(batch=batch, context=context, T=num_new, page=page_size,
                                                 causal=is_causal),
                us=t_kernel, eager_us=t_eager, ref_us=t_ref, sdpa_us=t_sdpa, gbps=gbps, frac_copy=gbps / copy_gbps,
                sdpa_frac_copy=moved / (t_sdpa * 1e-6) / 1e9 / copy_gbps, vs_sdpa=t_sdpa / t_kernel,
                max_err=err, sdpa_max_err=sdpa_err, ok=err < 2e-2 * max(1.0, want.abs().max().item()))


def bench_kv_append(num_tokens, copy_gbps, gen):
    from trimode.plugins.kv_append import kv_append_reference, kv_append_triton
    page = 16
    k_pool = torch.zeros(num_tokens // page + 8, page, HKV, D, device=DEV, dtype=DTYPE)
    v_pool = torch.zeros_like(k_pool)
    k_new, v_new = (torch.randn(num_tokens, HKV, D, device=DEV, dtype=DTYPE, generator=gen) for _ in range(2))
    slots = torch.randperm(k_pool.shape[0] * page, device=DEV, generator=gen)[:num_tokens]
    kv_append_triton(k_new, v_new, k_pool, v_pool, slots)
    k2, v2 = torch.zeros_like(k_pool), torch.zeros_like(v_pool)
    kv_append_reference(k_new, v_new, k2, v2, slots)
    ok = torch.equal(k_pool, k2) and torch.equal(v_pool, v2)
    t = gpu_time(lambda: kv_append_triton(k_new, v_new, k_pool, v_pool, slots))
    t_ref = do_bench(lambda: kv_append_reference(k_new, v_new, k_pool, v_pool, slots))
    moved = 2 * 2 * num_tokens * HKV * D * 2
    return dict(op="kv_append", shape=dict(tokens=num_tokens), us=t, ref_us=t_ref, gbps=moved / (t * 1e-6) / 1e9,
                frac_copy=moved / (t * 1e-6) / 1e9 / copy_gbps, max_err=0.0 if ok else math.inf, ok=ok)


def bench_draft_verify(num_seqs, block, copy_gbps, gen):
    from trimode.plugins import draft_verify as dv
    logits = torch.randn(num_seqs, block, VOCAB, device=DEV, dtype=DTYPE, generator=gen)
    target = logits.float().index_fill(-1, torch.tensor([MASK], device=DEV), -math.inf).argmax(-1)
    draft = target[:, :-1].int().contiguous()  # every draft matches: the kernel reads all B rows (worst case)
    lens = torch.full((num_seqs,), block - 1, dtype=torch.int32, device=DEV)
    got = dv.draft_verify_greedy_triton(draft, logits, lens, MASK)
    want = dv.draft_verify_greedy_reference(draft, logits, lens, MASK)
    ok = all(torch.equal(a, b) for a, b in zip(got, want))
    t = gpu_time(lambda: dv.draft_verify_greedy_triton(draft, logits, lens, MASK))
    t_ref = do_bench(lambda: dv.draft_verify_greedy_reference(draft, logits, lens, MASK))
    moved = logits.numel() * logits.element_size()
    rows = [dict(op="draft_verify", shape=dict(seqs=num_seqs, B=block, V=VOCAB), us=t, ref_us=t_ref,
                 gbps=moved / (t * 1e-6) / 1e9, frac_copy=moved / (t * 1e-6) / 1e9 / copy_gbps, ok=ok)]
    # rejection sampling: fp32 probabilities, drafts drawn from q
    p = torch.softmax(torch.randn(num_seqs, block, VOCAB, device=DEV, generator=gen), -1)
    q = torch.softmax(torch.randn(num_seqs, block - 1, VOCAB, device=DEV, generator=gen), -1)
    draft = torch.multinomial(q.view(-1, VOCAB), 1, generator=gen).view(num_seqs, block - 1).int()
    u = torch.rand(num_seqs, block, device=DEV, generator=gen)
    got = dv.draft_verify_sampling_triton(draft, lens, q, p, u)
    want = dv.draft_verify_sampling_reference(draft, lens, q, p, u)
    ok = bool((got[0] == want[0]).all()) and int((got[1] != want[1]).sum()) <= max(1, num_seqs // 32)
    t = gpu_time(lambda: dv.draft_verify_sampling_triton(draft, lens, q, p, u))
    t_ref = do_bench(lambda: dv.draft_verify_sampling_reference(draft, lens, q, p, u))
    rows.append(dict(op="draft_verify_sampling", shape=dict(seqs=num_seqs, B=block, V=VOCAB), us=t, ref_us=t_ref,
                     ok=ok))
    return rows


def bench_confidence(num_rows, copy_gbps, gen):
    from trimode.plugins import confidence_unmask as cu
    logits = torch.randn(num_rows, VOCAB, device=DEV, dtype=DTYPE, generator=gen)
    masked = torch.ones(num_rows, dtype=torch.bool, device=DEV)
    got, want = cu.confidence_unmask_triton(logits, masked, MASK), cu.confidence_unmask_reference(logits, masked, MASK)
    ok = torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], rtol=1e-4, atol=1e-9)
    t = gpu_time(lambda: cu.confidence_unmask_triton(logits, masked, MASK))
    t_ref = do_bench(lambda: cu.confidence_unmask_reference(logits, masked, MASK))
    moved = logits.numel() * logits.element_size()
    return dict(op="confidence_unmask", shape=dict(rows=num_rows, V=VOCAB), us=t, ref_us=t_ref,
                gbps=moved / (t * 1e-6) / 1e9, frac_copy=moved / (t * 1e-6) / 1e9 / copy_gbps, ok=ok)


def cases(quick: bool):
    if DRY_RUN:
        yield from [("attention", (2, 40, 1, 16, True)), ("attention", (2, 20, 5, 4, False)),
                    ("attention", (1, 70, 3, 16, True)), ("kv_append", (8,)), ("draft_verify", (2, 4)),
                    ("confidence", (3,))]
        return
    if quick:
        decode = [(1, 8192, 16), (64, 1024, 16)]
        block = [(1, 8192, 16, 16, True), (32, 1024, 32, 16, False)]
    else:
        decode = [(b, c, p) for b in (1, 8, 64) for c in (1024, 8192) for p in (16, 64)]
        block = [(b, c, t, 16, causal) for b in (1, 32) for c in (1024, 8192) for t in (16, 32)
                 for causal in (True, False)]
    for b, c, p in decode:
        yield "attention", (b, c, 1, p, True)
    for b, c, t, p, causal in block:
        yield "attention", (b, c, t, p, causal)
    for n in ((64,) if quick else (64, 8192)):
        yield "kv_append", (n,)
    for s in ((1, 64) if not quick else (64,)):
        yield "draft_verify", (s, 16)
    for n in ((16, 1024) if not quick else (1024,)):
        yield "confidence", (n,)


def fmt(row) -> str:
    shape = " ".join(f"{k}={v}" for k, v in row["shape"].items())
    parts = [f"{row['op']:<22} {shape:<48}", f"{row['us']:9.1f} us", f"ref {row['ref_us']:9.1f} us"]
    if "gbps" in row:
        parts.append(f"{row['gbps']:7.0f} GB/s ({100 * row['frac_copy']:5.1f}% of copy)")
    if "sdpa_us" in row:
        parts.append(f"sdpa {row['sdpa_us']:8.1f} us ({row['vs_sdpa']:4.2f}x)")
    parts.append("ok" if row["ok"] else f"MISMATCH (max err {row.get('max_err')})")
    return "  ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU in Triton's interpreter (no GPU)")
    args = ap.parse_args()
    if args.dry_run:
        _dry_run_setup()
    elif not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU here, nothing to benchmark")
        print(json.dumps({"gpu": None, "skipped": "no CUDA GPU"}))
        return 0
    import triton
    start = time.time()
    gen = torch.Generator(device=DEV).manual_seed(0)
    name = "dry run (CPU, Triton interpreter)" if DRY_RUN else torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth_gbps()
    print(f"{name}: device-to-device copy {copy_gbps:.0f} GB/s; torch {torch.__version__}, triton {triton.__version__}")
    rows, skipped = [], []
    for kind, shape in cases(args.quick):
        if time.time() - start > args.budget_s:
            skipped.append([kind, list(shape)])
            continue
        try:
            fn = {"attention": bench_attention, "kv_append": bench_kv_append, "draft_verify": bench_draft_verify,
                  "confidence": bench_confidence}[kind]
            out = fn(*shape, copy_gbps, gen)
        except Exception as e:  # keep going unattended; the failure is reported
            out = dict(op=kind, shape=dict(zip("abcdef", shape)), us=math.nan, ref_us=math.nan, ok=False,
                       error=f"{type(e).__name__}: {e}")
        for row in out if isinstance(out, list) else [out]:
            rows.append(row)
            print(fmt(row) if "error" not in row else f"{kind} {shape}: ERROR {row['error']}", flush=True)
        if not DRY_RUN:
            torch.cuda.empty_cache()
    attn = [r for r in rows if r["op"] == "paged_attention" and "error" not in r]
    decode = [r for r in attn if r["shape"]["T"] == 1]
    block = [r for r in attn if r["shape"]["T"] > 1]
    summary = dict(
        decode_min_frac_copy=min((r["frac_copy"] for r in decode), default=None),
        decode_median_frac_copy=_median([r["frac_copy"] for r in decode]),
        block_min_frac_copy=min((r["frac_copy"] for r in block), default=None),
        block_median_frac_copy=_median([r["frac_copy"] for r in block]),
        min_vs_sdpa=min((r["vs_sdpa"] for r in attn), default=None),
        all_correct=all(r["ok"] for r in rows), seconds=round(time.time() - start, 1), skipped=skipped)
    print(f"summary: {summary}")
    print(json.dumps(dict(gpu=name, date=datetime.date.today().isoformat(), torch=torch.__version__,
                          triton=triton.__version__, copy_gbps=copy_gbps, summary=summary, results=rows)))
    return 0 if summary["all_correct"] else 1


def _dry_run_setup() -> None:
    import os
    global HQ, HKV, D, VOCAB, DEV, DRY_RUN
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernel modules are imported
    HQ, HKV, D, VOCAB, DEV, DRY_RUN = 4, 2, 16, 300, "cpu", True
    torch.set_num_threads(1)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


if __name__ == "__main__":
    sys.exit(main())

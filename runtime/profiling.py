"""The pass-cost profile of a runtime: what a forward of T new tokens per sequence costs, by pass kind and batch,
and how much of a decoding step is host work outside the forward, by mode.

Self-speculation and block diffusion win only when a pass of B tokens costs little more than a pass of one:
``c(T) / c(1)`` (the median time of a T-token pass over that of a 1-token decode pass, same batch) is the number
that decides it on a given machine, executor and model, and the one the docs and load-adaptive scheduling use.

``pass_costs`` times ``executor.forward`` directly on sequences holding a committed prefix of ``context_len``
tokens (their pages are reserved; what the pool holds does not change the cost): kind ``decode`` (T = 1,
causal, K/V kept), ``verify`` (causal, kept), ``draft`` (block-bidirectional, LoRA on when the model has one,
nothing kept) and ``denoise`` (block-bidirectional, nothing kept). Kept passes write into their reserved slots
and the lengths are never advanced, so every repeat computes the same pass. ``host_overhead`` runs real
requests in each mode and splits each step's wall time into the forward and the rest (planning, page
bookkeeping, sampling, acceptance, unmasking). CUDA work is synchronised before each clock read.

``profile`` puts both into one JSON-able dict; ``plot`` draws it (matplotlib, the ``bench`` extra);
``PassCostTable`` reads it back as a cost lookup.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

import torch

from trimode.runtime.executors.base import Executor
from trimode.runtime.passes import PassKind, SeqPass
from trimode.runtime.request import mode_config
from trimode.runtime.scheduling import PassCostTable  # noqa: F401  (the lookup of a profile's costs)

TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64)
BATCH_SIZES = (1, 4, 16)
PASS_KINDS = ("decode", "verify", "draft", "denoise")
MODES = ("ar", "diffusion", "spec")


class ProfileError(ValueError):
    """A profile that cannot be run as asked (the message names the argument and what is allowed)."""


@dataclass
class PassCost:
    """Median / 10th / 90th percentile wall time (ms) of one forward of ``batch`` passes of ``num_tokens`` each."""

    kind: str
    batch: int
    num_tokens: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int


@dataclass
class HostShare:
    """One mode's decoding at ``batch`` requests: steps, mean step time, of which in the forward / outside it."""

    mode: str
    batch: int
    num_steps: int
    num_tokens: int
    step_ms: float
    forward_ms: float
    host_ms: float
    host_share: float  # host_ms / step_ms


@dataclass
class _Timed:
    times: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _passes(kind: str, seq_ids: Sequence[int], num_tokens: int, context_len: int, mask_token_id: int,
            decide: bool = False) -> list[SeqPass]:
    """One pass of ``kind`` per sequence: ``num_tokens`` new tokens after a ``context_len``-token prefix; with
    ``decide``, taking the engine's decision as a greedy request's pass does (draft rows: the masked ones)."""
    out = []
    for i, seq_id in enumerate(seq_ids):
        ids = tuple((7 * i + 3 * j + 2) % 97 + 2 for j in range(num_tokens))
        masked = ()
        if kind in ("draft", "denoise"):
            ids = ids[:1] + (mask_token_id,) * (num_tokens - 1)
            masked = tuple(range(1, num_tokens)) if decide else ()
        out.append(SeqPass(seq_id, PassKind(kind), ids, context_len,
                           num_logits=1 if kind == "decode" else num_tokens,
                           use_lora=kind == "draft", decide=decide and (bool(masked) or PassKind(kind).is_causal),
                           decide_rows=masked))
    return out


def pass_costs(executor: Executor, mask_token_id: int, token_counts: Sequence[int] = TOKEN_COUNTS,
               batch_sizes: Sequence[int] = BATCH_SIZES, kinds: Sequence[str] = PASS_KINDS,
               context_len: int = 64, repeats: int = 20, warmup: int = 3) -> list[PassCost]:
    """The median time of ``executor.forward`` over ``repeats`` runs (after ``warmup``) for every pass kind in
    ``kinds`` (``decode`` at T = 1 only), token count T and batch size; draft passes ask for the drafter LoRA
    (an executor without one runs them without); passes take the engine's decisions where the executor decides
    (as greedy requests' passes do). Sequences ids 1_000_000.. are added to
    ``executor.cache`` with ``context_len + max(T)`` tokens of pages reserved and freed at the end. Raises
    ``ProfileError`` when the cache cannot hold them (name: ``num_pages``)."""
    cache = executor.cache
    device = cache.k_pool.device
    unknown = sorted(set(kinds) - set(PASS_KINDS))
    if unknown:
        raise ProfileError(f"unknown pass kinds {unknown}; choose from {PASS_KINDS}")
    if min(token_counts) < 1 or min(batch_sizes) < 1 or context_len < 0 or repeats < 1:
        raise ProfileError("token counts, batch sizes and repeats must be >= 1 and context_len >= 0, got "
                           f"{list(token_counts)}, {list(batch_sizes)}, {repeats}, {context_len}")
    max_batch, total = max(batch_sizes), context_len + max(token_counts)
    if cache.pages_for(total) * max_batch > cache.stats().num_free_pages:
        raise ProfileError(f"the KV cache has {cache.stats().num_free_pages} free pages; the profile needs "
                           f"{cache.pages_for(total) * max_batch} ({max_batch} sequences of {total} tokens): "
                           "raise num_pages (an engine directory's: up to its max_pages_total) or profile fewer "
                           "or shorter sequences (batch sizes, token counts, context_len)")
    seq_ids = [1_000_000 + i for i in range(max_batch)]
    for s in seq_ids:
        cache.add_sequence(s)
        cache.reserve(s, total)
        cache.set_length(s, context_len)
    out = []
    try:
        for batch in batch_sizes:
            for kind in kinds:
                for t in ([1] if kind == "decode" else token_counts):
                    passes = _passes(kind, seq_ids[:batch], t, context_len, mask_token_id, executor.decides)
                    times = []
                    for n in range(warmup + repeats):
                        _sync(device)
                        start = time.perf_counter()
                        executor.forward(passes)
                        _sync(device)
                        if n >= warmup:
                            times.append((time.perf_counter() - start) * 1e3)
                    out.append(PassCost(kind, batch, t, statistics.median(times), _percentile(times, 0.1),
                                        _percentile(times, 0.9), repeats))
    finally:
        for s in seq_ids:
            cache.free(s)
    return out


def cost_ratios(costs: Sequence[PassCost]) -> dict[str, dict[str, dict[str, float]]]:
    """c(T) / c(1): {batch: {kind: {T: median of the T-token pass of kind / median of the decode pass}}}, per
    batch (keys are strings, as in JSON). Needs the decode pass of each batch."""
    base = {c.batch: c.median_ms for c in costs if c.kind == "decode"}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for c in costs:
        if c.kind != "decode" and c.batch in base:
            out.setdefault(str(c.batch), {}).setdefault(c.kind, {})[str(c.num_tokens)] = c.median_ms / base[c.batch]
    return out


class _TimedExecutor(Executor):
    """Delegates to ``inner`` and records the wall time of each forward (CUDA synchronised)."""

    def __init__(self, inner: Executor) -> None:
        self.inner, self.cache, self.times = inner, inner.cache, []
        self.decides = inner.decides

    def forward(self, passes):
        device = self.cache.k_pool.device
        _sync(device)
        start = time.perf_counter()
        out = self.inner.forward(passes)
        _sync(device)
        self.times.append(time.perf_counter() - start)
        return out


def host_overhead(lm: Any, prompt_ids: Sequence[int], modes: Sequence[str] = MODES, batch_sizes: Sequence[int] = (1, 4),
                  max_new_tokens: int = 32, block_length: int = 16, repeats: int = 2) -> list[HostShare]:
    """Per mode and batch: ``batch`` greedy requests of ``max_new_tokens`` from ``prompt_ids`` run on ``lm``
    (a ``TriModeLM``) with its engine's executor wrapped by a timer; the best of ``repeats`` runs (after one
    warm-up). Host time is the step loop's wall time minus the forwards'."""
    engine = lm.engine
    out = []
    for mode in modes:
        config = mode_config(mode, lm.default_block_length, block_length if mode != "ar" else None)
        for batch in batch_sizes:
            requests = [lm.request(list(prompt_ids), max_new_tokens, config) for _ in range(batch)]
            best = None
            for n in range(repeats + 1):
                timed = _TimedExecutor(engine.executor)
                engine.executor, inner = timed, engine.executor
                steps = engine.num_steps
                try:
                    start = time.perf_counter()
                    results = lm.run(requests)
                    wall = time.perf_counter() - start
                finally:
                    engine.executor = inner
                num_steps = engine.num_steps - steps
                tokens = sum(len(r.token_ids) for r in results)
                if n and (best is None or wall < best[0]):
                    best = (wall, sum(timed.times), num_steps, tokens)
            wall, fwd, num_steps, tokens = best
            out.append(HostShare(mode, batch, num_steps, tokens, 1e3 * wall / num_steps, 1e3 * fwd / num_steps,
                                 1e3 * (wall - fwd) / num_steps, (wall - fwd) / wall))
    return out


def profile(lm: Any, source: str, executor: str, token_counts: Sequence[int] = TOKEN_COUNTS,
            batch_sizes: Sequence[int] = BATCH_SIZES, kinds: Sequence[str] = PASS_KINDS, context_len: int = 64,
            repeats: int = 20, host_modes: Sequence[str] = MODES, host_batches: Sequence[int] = (1, 4),
            host_tokens: int = 32, block_length: int | None = None, prompt_ids: Sequence[int] | None = None
            ) -> dict[str, Any]:
    """The whole profile of ``lm`` (a ``TriModeLM``) as a JSON-able dict: ``meta`` (source, executor, device,
    threads, versions, machine, date), ``passes`` (``PassCost`` rows), ``ratios`` (``cost_ratios``) and
    ``host`` (``HostShare`` rows; empty when ``host_modes`` is)."""
    import dataclasses

    device = lm.cache.k_pool.device
    costs = pass_costs(lm.executor, lm.config.mask_token_id, token_counts, batch_sizes, kinds, context_len, repeats)
    block = block_length or lm.default_block_length
    prompt = list(prompt_ids) if prompt_ids is not None else [(5 * j) % 97 + 2 for j in range(context_len or 16)]
    host = host_overhead(lm, prompt, host_modes, host_batches, host_tokens, block) if host_modes else []
    versions = {"torch": torch.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    meta = {"source": source, "executor": executor, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "torch_threads": torch.get_num_threads(), "executor_threads": getattr(lm.executor, "threads", None),
            "settings_threads": getattr(lm.settings, "threads", None), "context_len": context_len,
            "repeats": repeats, "block_length": block, "versions": versions, "machine": platform.machine(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    return {"meta": meta, "passes": [dataclasses.asdict(c) for c in costs],
            "ratios": cost_ratios(costs), "host": [dataclasses.asdict(h) for h in host]}


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A readable table of a ``profile`` result: pass medians by kind and T per batch, c(T)/c(1), host shares."""
    lines = []
    rows = result["passes"]
    counts = sorted({r["num_tokens"] for r in rows})
    for batch in sorted({r["batch"] for r in rows}):
        lines.append(f"batch {batch}: median ms per forward (c(T)/c(1))")
        lines.append("  kind     " + "".join(f"{'T=' + str(t):>16s}" for t in counts))
        decode = next((r["median_ms"] for r in rows if r["batch"] == batch and r["kind"] == "decode"), None)
        for kind in PASS_KINDS:
            by_t = {r["num_tokens"]: r["median_ms"] for r in rows if r["batch"] == batch and r["kind"] == kind}
            if not by_t:
                continue
            cells = "".join(f"{by_t[t]:9.2f} ({by_t[t] / decode:4.1f})" if t in by_t and decode else f"{'':>16s}"
                            for t in counts)
            lines.append(f"  {kind:8s} " + cells)
    for h in result["host"]:
        lines.append(f"host {h['mode']:9s} batch {h['batch']:2d}: {h['step_ms']:.2f} ms/step, forward "
                     f"{h['forward_ms']:.2f}, host {h['host_ms']:.2f} ({100 * h['host_share']:.1f}%)")
    return lines


def plot(result: dict[str, Any], path) -> bool:
    """Write a PNG of ``result``: median ms per forward against T (log-log) and c(T)/c(1), one column per batch.
    Returns False (writing nothing) when matplotlib is not installed (``pip install trimode[bench]``)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["passes"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(4.5 * len(batches), 7), squeeze=False)
    for col, batch in enumerate(batches):
        for kind in PASS_KINDS:
            pts = sorted((r["num_tokens"], r["median_ms"]) for r in rows if r["batch"] == batch and r["kind"] == kind)
            if not pts:
                continue
            xs, ys = zip(*pts)
            color = f"C{PASS_KINDS.index(kind)}"
            axes[0][col].plot(xs, ys, "o-" if len(xs) > 1 else "s", color=color, label=kind)
            ratios = result["ratios"].get(str(batch), {}).get(kind)
            if ratios:
                ts = sorted(int(t) for t in ratios)
                axes[1][col].plot(ts, [ratios[str(t)] for t in ts], "o-", color=color, label=kind)
        axes[0][col].set(xscale="log", yscale="log", title=f"batch {batch}", xlabel="tokens per sequence (T)",
                         ylabel="median ms per forward")
        axes[1][col].set(xscale="log", xlabel="tokens per sequence (T)", ylabel="c(T) / c(1)")
        axes[1][col].axhline(1.0, color="gray", lw=0.8)
        for ax in axes[:, col]:
            ax.set_xticks(sorted({r["num_tokens"] for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            if ax is axes[0][col]:  # log scale: ticks at 1, 2, 5 x 10^k
                ax.get_yaxis().set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.get_yaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.get_yaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.legend(fontsize=8)
    meta = result["meta"]
    threads = f"{meta['executor_threads']} threads (torch {meta['torch_threads']})" if meta["executor_threads"] \
        else f"{meta['torch_threads']} torch threads"
    fig.suptitle(f"{meta['source']}, {meta['executor']} executor, {meta['device_name']}, {threads}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True

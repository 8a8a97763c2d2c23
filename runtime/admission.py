"""What can run: a request against the limits it can never exceed, and a step's passes against what is left of
each engine kind's budget. The limits are the model's positions, the one page pool, and an engine directory's
build-time limits (``executors.engine_dir.EngineLimits``: the modes built, max_seq, tokens per forward of each
engine kind, sequences per forward). The engine loop (runtime.engine) calls these at ``add_request`` and while
planning a step.
"""

from __future__ import annotations

from trimode.runtime.executors.engine_dir import EngineLimits
from trimode.runtime.executors.engine_kinds import PASS_TO_KIND
from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.passes import PassKind, SeqPass
from trimode.runtime.request import GenerationRequest, Mode, RequestError

# the passes each mode runs, and how many tokens each holds (b: the mode's block length)
MODE_PASSES = {Mode.AR: ((PassKind.DECODE, lambda b: 1),),
               Mode.DIFFUSION: ((PassKind.DENOISE, lambda b: b), (PassKind.COMMIT, lambda b: b)),
               Mode.SPEC: ((PassKind.DRAFT, lambda b: b), (PassKind.VERIFY, lambda b: b)),
               Mode.AUTO: ((PassKind.DECODE, lambda b: 1), (PassKind.DRAFT, lambda b: b),
                           (PassKind.VERIFY, lambda b: b))}
RUNS_AS = {Mode.AUTO: ("ar", "spec"), Mode.FUSED_SPEC: ("spec",)}  # the built modes a mode runs as


def max_sequence_tokens(max_positions: int, cache: PagedKVCache, limits: EngineLimits | None) -> int:
    """The most tokens (prompt + new) one sequence can ever hold: the model's positions, the whole page pool, and
    an engine directory's max_seq, whichever is least (``check_request`` names which)."""
    bounds = [max_positions, cache.num_pages * cache.page_size]
    return min(bounds + ([limits.max_seq] if limits is not None else []))


def check_request(request: GenerationRequest, max_positions: int, cache: PagedKVCache,
                  limits: EngineLimits | None) -> None:
    """Raise ``RequestError`` naming the limit if ``request`` can never run: more positions than the model (or
    the engines) hold, more tokens (prompt + max_new_tokens) than the whole page pool holds (no sequence is ever
    preempted, so it could only fail later), a mode whose engines were not built, or a pass longer than its
    engine kind's tokens per forward."""
    total = len(request.prompt_ids) + request.max_new_tokens
    if total > max_positions:
        raise RequestError(f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                           f"({request.max_new_tokens}) exceeds the model's {max_positions} positions")
    capacity = cache.num_pages * cache.page_size
    if total > capacity:
        raise RequestError(f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens})"
                           f" does not fit in the KV cache: {cache.num_pages} pages of "
                           f"{cache.page_size} tokens hold {capacity} tokens in all (num_pages)")
    lim = limits
    if lim is None:
        return
    if total > lim.max_seq:
        raise RequestError(f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens})"
                           f" exceeds max_seq = {lim.max_seq}, the sequence length the engines of {lim.source} "
                           f"were built for")
    passes = [(PassKind.PREFILL, len(request.prompt_ids), "the prompt")]
    for cfg in (request.mode, *(m for _, m in request.switches)):
        for needed in RUNS_AS.get(cfg.mode, (cfg.mode.value,)):
            if needed not in lim.modes:
                raise RequestError(f"mode {cfg.mode.value!r} is not available: the engines of {lim.source} were "
                                   f"built for modes {list(lim.modes)} (build_engine.py --modes)")
        block = getattr(cfg, "block_length", 1)
        if cfg.mode is Mode.FUSED_SPEC:  # a fused step: the chain (verify) and the sub-blocks (draft)
            if cfg.num_subblocks > lim.max_batch:
                raise RequestError(f"fused_spec's {cfg.num_subblocks} sub-blocks are {cfg.num_subblocks} draft "
                                   f"passes per step, more than the max_batch of {lim.max_batch} the engines of "
                                   f"{lim.source} were built for (num_subblocks)")
            chain, subs = cfg.max_pass_tokens
            passes += [(PassKind.VERIFY, chain, f"a fused_spec chain of {chain}"),
                       (PassKind.DRAFT, max(subs, block), f"fused_spec's sub-blocks ({cfg.num_subblocks} x "
                                                         f"{cfg.next_block_length} tokens)")]
            continue
        passes += [(kind, size(block), f"a {cfg.mode.value} block of {block}") for kind, size in MODE_PASSES[cfg.mode]]
    for kind, num_tokens, what in passes:
        engine_kind = PASS_TO_KIND[kind]
        most = lim.max_tokens.get(engine_kind)
        if most is not None and num_tokens > most:
            raise RequestError(f"{what} needs a {kind.value} pass of {num_tokens} tokens, more than the "
                               f"{most} tokens per forward the {engine_kind!r} engine of {lim.source} was built for "
                               f"(max_batch x (block_length + 1) for block passes)")


def fits(passes: list[SeqPass], used: dict, limits: EngineLimits | None) -> bool:
    """Whether ``passes`` (one sequence's, run together) fit what is left of their engine kinds' budgets this
    step: tokens per forward, and passes per forward (an engine runs at most ``max_batch`` sequences: a fused
    spec step's sub-blocks are one each). ``used`` holds tokens by kind and passes by ("passes", kind)."""
    if limits is None:
        return True
    need: dict = {}
    for p in passes:
        kind = PASS_TO_KIND[p.kind]
        need[kind] = need.get(kind, 0) + p.num_tokens
        need[("passes", kind)] = need.get(("passes", kind), 0) + 1
    for key, n in need.items():
        most = limits.max_batch if isinstance(key, tuple) else limits.max_tokens.get(key)
        if most is not None and used.get(key, 0) + n > most:
            return False
    return True

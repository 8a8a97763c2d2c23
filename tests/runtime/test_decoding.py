"""The three modes over one loop: lossless self-speculation, diffusion rules, mode switches, mixed batches,
and that every page comes back whatever way a request ends."""

import pytest
import torch

import trimode.runtime.modes as modes
from trimode.runtime.request import ARConfig, DiffusionConfig, RequestError, SpecConfig, mode_config

from conftest import make_lm, random_prompts

MIXED = [3, 7, 12, 5]


def _tokens(results):
    return [r.token_ids for r in results]


def _all_free(lm):
    s = lm.cache.stats()
    return s.num_free_pages == s.num_pages and s.num_sequences == 0


@pytest.mark.parametrize("variant", ["gqa2-yarn-lora", "mha-default-rope", "gqa4-yarn-qscale"])
@pytest.mark.parametrize("block_length", [4, 8, 16])
def test_spec_greedy_is_lossless(checkpoints, variant, block_length):
    lm = make_lm(checkpoints[variant])
    for lengths, seed in (([9], 1), (MIXED, 2)):
        prompts = random_prompts(lengths, seed=seed)
        ar = _tokens(lm.ar_generate(prompts, max_new_tokens=30, eos_token_ids=()))
        for use_lora in (True, False):
            spec = lm.linear_spec_generate(prompts, max_new_tokens=30, block_length=block_length,
                                           use_lora=use_lora, eos_token_ids=())
            assert _tokens(spec) == ar, f"{variant} B={block_length} lora={use_lora} batch={len(prompts)}"
            assert all(sum(r.accepted_lengths) == 29 for r in spec)  # every token after t0 comes from a verify
    assert _all_free(lm)


def test_spec_with_threshold_drafts_is_lossless(ckpt):
    lm = make_lm(ckpt)
    prompts = random_prompts(MIXED, seed=4)
    ar = _tokens(lm.ar_generate(prompts, max_new_tokens=25, eos_token_ids=()))
    spec = lm.linear_spec_generate(prompts, max_new_tokens=25, block_length=8, threshold=0.3, eos_token_ids=())
    assert _tokens(spec) == ar
    assert all(r.forwards["draft"] > r.forwards["verify"] - 1 for r in spec)


def test_diffusion_block_length_one_equals_ar(checkpoints):
    for path in checkpoints.values():
        lm = make_lm(path)
        prompts = random_prompts(MIXED, seed=5)
        ar = _tokens(lm.ar_generate(prompts, max_new_tokens=17, eos_token_ids=()))
        assert _tokens(lm.generate(prompts, max_new_tokens=17, block_length=1, eos_token_ids=())) == ar


@pytest.mark.parametrize("policy", ["threshold", "topk", "leftmost"])
def test_diffusion_lengths_not_multiple_of_block(ckpt, policy):
    lm = make_lm(ckpt)
    prompts = random_prompts(MIXED, seed=6)
    threshold = 0.2 if policy == "threshold" else None
    res = lm.generate(prompts, max_new_tokens=21, block_length=8, policy=policy, threshold=threshold,
                      eos_token_ids=())
    for r in res:
        assert len(r.token_ids) == 21 and r.finish_reason == "length"
        assert 3 not in r.token_ids  # the mask token is never emitted
        # 21 tokens = seed + 7 per block: blocks of 8, 8, 7 (last block shortened) -> 2 commits
        assert r.forwards["commit"] == 2 and r.forwards["denoise"] == sum(1 for _ in r.revealed_per_step)
        assert sum(r.revealed_per_step) == 21 - 3  # every token except the three seeds was revealed
    if policy != "threshold":  # top-k / leftmost with max_steps = B reveal exactly one per step here
        assert all(n == 1 for r in res for n in r.revealed_per_step)
    assert _all_free(lm)


def test_threshold_policy_never_reveals_below_tau_except_forced(ckpt, monkeypatch):
    recorded = []
    real = modes.reveal

    def recording(confidence, is_masked, policy, threshold, k, is_last_step):
        chosen = real(confidence, is_masked, policy, threshold, k, is_last_step)
        recorded.append((confidence.clone(), is_masked.clone(), chosen.clone(), threshold, is_last_step))
        return chosen

    monkeypatch.setattr(modes, "reveal", recording)
    lm = make_lm(ckpt)
    tau = 0.15
    lm.generate(random_prompts(MIXED, seed=7), max_new_tokens=24, block_length=8, threshold=tau, eos_token_ids=())
    assert recorded
    saw_multi = False
    for conf, masked, chosen, threshold, last in recorded:
        assert threshold == tau
        assert not (chosen & ~masked).any(), "only masked positions may be revealed"
        assert chosen.any(), "every step reveals at least one position"
        if last:
            assert torch.equal(chosen, masked)
            continue
        below = chosen & (conf < tau)
        assert below.sum() <= 1, "at most the forced best position may be under tau"
        if below.any():
            assert chosen.sum() == 1 and conf[below].item() == conf[masked].max().item()
        # every masked position at or above tau is revealed
        assert torch.equal(chosen & (conf >= tau), masked & (conf >= tau))
        saw_multi |= bool(chosen.sum() > 1)
    assert saw_multi, "the test should exercise steps that reveal several tokens"


def test_mode_switch_midway_keeps_greedy_tokens(checkpoints):
    lm = make_lm(checkpoints["gqa2-yarn-lora"])
    prompts = random_prompts(MIXED, seed=8)
    ar = _tokens(lm.ar_generate(prompts, max_new_tokens=40, eos_token_ids=()))
    plans = [
        (ARConfig(), ((16, SpecConfig(8)),)),
        (SpecConfig(4), ((10, ARConfig()), (20, SpecConfig(16)))),
        (ARConfig(), ((5, DiffusionConfig(1)), (12, SpecConfig(8)))),
    ]
    for first, switches in plans:
        reqs = [lm.request(p, 40, first, eos_token_ids=(), switches=switches) for p in prompts]
        res = lm.run(reqs)
        assert _tokens(res) == ar, f"{first} -> {switches}"
        assert res[0].forwards["verify"] > 0
    assert _all_free(lm)


def test_mixed_modes_share_a_batch(ckpt):
    lm = make_lm(ckpt)
    prompts = random_prompts(MIXED, seed=9)
    confs = [ARConfig(), SpecConfig(8), DiffusionConfig(8, threshold=0.5), DiffusionConfig(4, "topk", None)]
    alone = [lm.run([lm.request(p, 20, c, eos_token_ids=())])[0].token_ids for p, c in zip(prompts, confs)]
    steps_before = lm.engine.num_steps
    together = lm.run([lm.request(p, 20, c, eos_token_ids=()) for p, c in zip(prompts, confs)])
    assert _tokens(together) == alone
    per_request = max(r.num_forwards for r in together)
    assert lm.engine.num_steps - steps_before == per_request, "all modes ran in the same forwards"


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_eos_stops_and_frees(ckpt, mode):
    lm = make_lm(ckpt)
    prompts = random_prompts(MIXED, seed=10)
    plain = lm.ar_generate(prompts, max_new_tokens=30, eos_token_ids=())
    eos = plain[1].token_ids[6]
    kwargs = dict(max_new_tokens=30, eos_token_ids=(eos,))
    run = {"ar": lm.ar_generate, "spec": lambda p, **k: lm.linear_spec_generate(p, block_length=8, **k),
           "diffusion": lambda p, **k: lm.generate(p, block_length=1, **k)}[mode]
    res = run(prompts, **kwargs)
    for r, full in zip(res, plain):
        cut = full.token_ids.index(eos) + 1 if eos in full.token_ids else 30
        assert r.token_ids == full.token_ids[:cut]
        assert r.finish_reason == ("stop" if eos in full.token_ids else "length")
    assert _all_free(lm)


def test_diffusion_eos_inside_block_stops(ckpt):
    lm = make_lm(ckpt)
    prompts = random_prompts(MIXED, seed=11)
    first = lm.generate(prompts, max_new_tokens=24, block_length=8, threshold=0.5, eos_token_ids=())
    eos = first[0].token_ids[10]
    res = lm.generate(prompts, max_new_tokens=24, block_length=8, threshold=0.5, eos_token_ids=(eos,))
    r = res[0]
    assert r.finish_reason == "stop" and r.token_ids[-1] == eos and eos not in r.token_ids[:-1]
    assert _all_free(lm)


def test_exhausted_cache_queues_then_all_finish(ckpt):
    lm = make_lm(ckpt, page_size=4, num_pages=12)  # 48 token slots, four requests want ~25 each
    prompts = random_prompts(MIXED, seed=12)
    res = lm.run([lm.request(p, 20, SpecConfig(8), eos_token_ids=()) for p in prompts], raise_on_error=False)
    ok = [r for r in res if r.finish_reason == "length"]
    failed = [r for r in res if r.finish_reason == "error"]
    assert len(ok) + len(failed) == 4 and len(ok) >= 2
    assert all("KV cache exhausted" in r.error for r in failed)
    alone = make_lm(ckpt).linear_spec_generate([prompts[i] for i, r in enumerate(res) if r in ok],
                                                 max_new_tokens=20, block_length=8, eos_token_ids=())
    assert _tokens(ok) == _tokens(alone)
    assert _all_free(lm)


def test_request_that_cannot_fit_raises_typed_error_and_leaks_nothing(ckpt):
    """Larger than the whole pool: refused up front, naming the limit; beside other requests, a pool that runs
    out at run time fails the newest stuck one with the typed KVCacheExhausted (the queueing test above)."""
    lm = make_lm(ckpt, page_size=4, num_pages=3)
    for mode in ("ar", "diffusion", "spec"):
        with pytest.raises(RequestError, match=r"\+ max_new_tokens \(10\) does not fit in the KV cache: 3 pages"):
            lm.run([lm.request(list(range(10, 20)), 10, mode_config(mode, 4), eos_token_ids=())])
    assert _all_free(lm)
    # the engine keeps serving after the failure
    assert len(lm.ar_generate([[5, 6]], max_new_tokens=3)[0].token_ids) == 3


def test_counters(ckpt):
    lm = make_lm(ckpt)
    r = lm.linear_spec_generate(random_prompts([6], seed=13), max_new_tokens=20, block_length=4, eos_token_ids=())[0]
    assert r.forwards["prefill"] == 1 and r.forwards["verify"] == len(r.accepted_lengths)
    assert r.num_forwards == 1 + r.forwards["draft"] + r.forwards["verify"]
    assert r.tokens_per_forward == pytest.approx(20 / r.num_forwards)
    assert all(1 <= n <= 4 for n in r.accepted_lengths) and r.wall_time_s > 0
    a = lm.ar_generate(random_prompts([6], seed=13), max_new_tokens=20, eos_token_ids=())[0]
    assert a.tokens_per_forward == 1.0 and a.forwards["decode"] == 19


@pytest.mark.parametrize("mode", ["spec", "fused_spec"])
def test_pool_after_each_step_equals_a_fresh_prefill(ckpt, mode):
    """At every step boundary the sequence's pool rows are what a fresh prefill of prompt + generated (minus the
    pending token) writes: rejected drafts' K/V truncated away, fused spec's sub-blocks never written."""
    from trimode.runtime.passes import PassKind, SeqPass
    from trimode.runtime.request import FusedSpecConfig

    lm, fresh = make_lm(ckpt), make_lm(ckpt)
    prompt = random_prompts([7], seed=12)[0]
    config = FusedSpecConfig(4, 2, 2) if mode == "fused_spec" else SpecConfig(4)
    engine = lm.engine
    sid = engine.add_request(lm.request(prompt, 24, config))
    checked = 0
    while sid not in engine.finished:
        engine.step()
        seq = next((s for s in engine.running if s.seq_id == sid), None)
        if seq is None or seq.policy_state is not None or seq.pending is None:
            continue
        text = list(prompt) + seq.generated[:-1]  # the pending token's K/V is not in the cache yet
        assert lm.cache.length(sid) == len(text)
        fresh.cache.add_sequence(0)
        fresh.cache.reserve(0, len(text))
        fresh.executor.forward([SeqPass(0, PassKind.PREFILL, tuple(text), 0)])
        for layer in range(lm.config.num_hidden_layers):
            got = lm.cache.gather(layer, lm.cache.slots(sid, 0, len(text)))
            want = fresh.cache.gather(layer, fresh.cache.slots(0, 0, len(text)))
            for a, b in zip(got, want):
                assert torch.allclose(a, b, atol=1e-5), (mode, len(text), layer, (a - b).abs().max())
        fresh.cache.free(0)
        checked += 1
    assert checked >= 3

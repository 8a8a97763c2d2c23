"""Sampling, rejection-sampling acceptance, unmasking rules and parameter validation."""

import math

import pytest
import torch

from trimode.runtime.acceptance import greedy_accept, rejection_accept
from trimode.runtime.request import DiffusionConfig, GenerationRequest, RequestError, SpecConfig
from trimode.runtime.sampling import SamplingError, SamplingParams, select_tokens, target_probs
from trimode.runtime.unmasking import even_schedule, reveal

from conftest import make_lm, random_prompts


def test_greedy_accept():
    assert greedy_accept([5, 6, 7], [5, 6, 9, 1]) == 3
    assert greedy_accept([5, 6, 7], [4, 6, 7, 1]) == 1
    assert greedy_accept([5, 6, 7], [5, 6, 7, 1]) == 4
    assert greedy_accept([], [8]) == 1


def test_rejection_sampling_reproduces_the_target_distribution():
    """First emitted token ~ p0 and, given the draft was accepted, the second ~ p1 (chi-square style bound)."""
    gen = torch.Generator().manual_seed(0)
    vocab = 6
    p = torch.softmax(torch.randn(2, vocab, generator=gen) * 1.5, -1)
    q = torch.softmax(torch.randn(1, vocab, generator=gen) * 1.5, -1)
    n = 20_000
    first = torch.zeros(vocab)
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=gen))
        out = rejection_accept([d], q, p, gen)
        first[out[0]] += 1
        assert len(out) == 2 if out[0] == d else len(out) == 1  # accepted draft + bonus, or a resample
    emp = first / n
    tol = 4 * torch.sqrt(p[0] * (1 - p[0]) / n) + 1e-3
    assert torch.all((emp - p[0]).abs() < tol), f"empirical {emp} vs target {p[0]}"


def test_rejection_sampling_accepts_everything_when_q_equals_p():
    p = torch.softmax(torch.randn(4, 10), -1)
    gen = torch.Generator().manual_seed(1)
    draft = [int(torch.multinomial(p[i], 1, generator=gen)) for i in range(3)]
    out = rejection_accept(draft, p[:3], p, gen)
    assert out[:3] == draft and len(out) == 4


def test_target_probs_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    probs = target_probs(logits, SamplingParams(1.0, top_k=2), mask_token_id=4)
    assert probs[0, 4] == 0 and (probs[0, :2] == 0).all() and probs[0, 2:4].sum().item() == pytest.approx(1)
    probs = target_probs(logits, SamplingParams(1.0, top_p=0.5), mask_token_id=0)
    assert (probs[0] > 0).sum() == 1 and probs[0, 4] == 1  # the top token alone carries >= 0.5
    greedy = select_tokens(logits, SamplingParams(), mask_token_id=4, generator=None)
    assert greedy.item() == 3  # the mask id is never selected


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=math.nan), dict(temperature=math.inf),
                                 dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5), dict(seed=-1)])
def test_bad_sampling_params(bad):
    with pytest.raises(SamplingError):
        SamplingParams(**bad)


def test_bad_requests():
    with pytest.raises(RequestError, match="prompt is empty"):
        GenerationRequest((), 5)
    with pytest.raises(RequestError, match="max_new_tokens"):
        GenerationRequest((1,), 0)
    with pytest.raises(RequestError, match="block_length"):
        SpecConfig(0)
    with pytest.raises(RequestError, match="policy must be one of"):
        DiffusionConfig(8, policy="random")
    with pytest.raises(RequestError, match="threshold applies only"):
        DiffusionConfig(8, policy="topk", threshold=0.5)
    with pytest.raises(RequestError, match="threshold 0"):
        GenerationRequest((1,), 5, SpecConfig(8, threshold=0.5), SamplingParams(temperature=1.0))


def test_request_validation_through_api(ckpt):
    lm = make_lm(ckpt)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        lm.ar_generate([[1, 99999]], max_new_tokens=4)
    with pytest.raises(RequestError, match="exceeds the model's"):
        lm.ar_generate([[5]], max_new_tokens=10**6)
    assert lm.cache.stats().num_free_pages == lm.cache.num_pages


def test_even_schedule_and_reveal():
    assert even_schedule(7, 3) == [3, 2, 2] and sum(even_schedule(15, 16)) == 15
    conf = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    masked = torch.tensor([True, True, True, False, True])
    assert reveal(conf, masked, "topk", None, 2, False).tolist() == [False, True, True, False, False]
    assert reveal(conf, masked, "leftmost", None, 2, False).tolist() == [True, True, False, False, False]
    assert reveal(conf, masked, "threshold", 0.95, 0, False).tolist() == [False, True, False, False, False]
    assert reveal(conf, masked, "threshold", 0.3, 0, True).tolist() == masked.tolist()


def test_seeded_sampling_is_reproducible_in_every_mode(ckpt):
    lm = make_lm(ckpt)
    prompts = random_prompts([5, 9], seed=3)
    for run in (lambda **k: lm.ar_generate(prompts, max_new_tokens=16, **k),
                lambda **k: lm.generate(prompts, max_new_tokens=16, block_length=4, **k),
                lambda **k: lm.linear_spec_generate(prompts, max_new_tokens=16, block_length=4, **k),
                lambda **k: lm.fused_spec_generate(prompts, max_new_tokens=16, block_length=4, **k)):
        a = [r.token_ids for r in run(temperature=1.0, top_p=0.9, seed=7)]
        b = [r.token_ids for r in run(temperature=1.0, top_p=0.9, seed=7)]
        c = [r.token_ids for r in run(temperature=1.0, top_p=0.9, seed=8)]
        assert a == b and a != c
        assert all(len(t) == 16 for t in a)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["spec", "fused_spec"])
def test_sampled_speculation_keeps_the_ar_distribution(ckpt, mode):
    """Temperature 1, top-k 2: the joint distribution of the first 4 generated tokens (16 sequences) over 2000
    seeds matches AR's within sampling noise (total variation: about 0.05 expected from noise alone). Tokens after
    the first pass through drafts and rejection sampling (fused spec: from its sub-blocks once it runs)."""
    from collections import Counter

    from trimode.runtime.request import mode_config

    lm = make_lm(ckpt, num_pages=4096)
    prompt = random_prompts([6], seed=11)[0]
    runs = 2000

    def joint(config) -> Counter:
        reqs = [lm.request(prompt, 4, config, temperature=1.0, top_k=2, seed=s) for s in range(runs)]
        return Counter(tuple(r.token_ids) for r in lm.run(reqs))

    p, q = joint(mode_config("ar", 4)), joint(mode_config(mode, 2, num_subblocks=2, subblock_length=2)
                                               if mode == "fused_spec" else mode_config(mode, 2))
    tv = sum(abs(p[k] - q[k]) for k in set(p) | set(q)) / (2 * runs)
    assert len(p) > 8 and tv < 0.1, f"{mode}: 4-token distribution differs from AR's (total variation {tv:.3f})"

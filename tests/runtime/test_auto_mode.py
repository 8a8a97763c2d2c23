"""Mode ``auto`` (runtime.scheduling): the decision on synthetic cost tables against brute force, the acceptance
estimate, and the engine: greedy auto output equals AR (batched, mixed with other modes, switching in and out),
and the counters add up."""

from __future__ import annotations

import itertools

import pytest

from conftest import make_lm, random_prompts
from trimode.runtime.request import ARConfig, AutoConfig, DiffusionConfig, GenerationRequest, RequestError, \
    SpecConfig, mode_config
from trimode.runtime.scheduling import (AcceptanceEstimate, Candidate, DefaultCosts, PassCostTable, decide,
                                        expected_tokens)


class Costs:
    """c(kind, N, T) = N * (1 + slope * (T - 1)) ms: slope 0 is a GPU's flat pass cost, 1 a CPU's linear one."""

    def __init__(self, slope: float) -> None:
        self.slope = slope

    def cost_ms(self, kind: str, batch: int, num_tokens: int) -> float:
        return batch * (1.0 + self.slope * (num_tokens - 1))


def brute_force(cands, batch, costs, lengths, fixed_tokens=0.0, fixed_ms=0.0) -> float:
    """The best expected tokens/ms over every assignment of AR or spec-with-one-common-B to the candidates."""
    best = 0.0
    ar = costs.cost_ms("decode", batch, 1) / batch
    for b in lengths:
        spec = (costs.cost_ms("draft", batch, b) + costs.cost_ms("verify", batch, b)) / (2 * batch)
        for choice in itertools.product([False, True], repeat=len(cands)):
            tokens = fixed_tokens + sum(min(expected_tokens(c.acceptance, b), c.remaining) / 2 if s else 1
                                        for c, s in zip(cands, choice))
            ms = fixed_ms + sum(spec if s else ar for s in choice)
            best = max(best, tokens / ms)
    return best


@pytest.mark.parametrize("slope, acceptance, want", [
    (0.0, 0.9, 16),    # block passes as cheap as one token, high acceptance: the longest block
    (1.0, 0.9, None),  # a B-token pass costs B decode passes: never worth it
    (0.0, 0.05, None),  # cheap passes but nothing accepted: two forwards for ~1 token
    (0.1, 0.8, 8),     # moderate costs: a middle block length pays best
])
def test_decision_for_one_sequence(slope, acceptance, want):
    d = decide([Candidate(acceptance, 100)], 1, Costs(slope), [4, 8, 16])
    assert d.block_lengths == [want]
    assert d.tokens_per_ms == pytest.approx(brute_force([Candidate(acceptance, 100)], 1, Costs(slope), [4, 8, 16]))


def test_mixed_batch_speculates_only_where_acceptance_pays():
    cands = [Candidate(0.95, 100), Candidate(0.1, 100), Candidate(0.9, 100), Candidate(0.3, 100)]
    d = decide(cands, 4, Costs(0.15), [4, 8])
    assert d.block_lengths[1] is None and d.block_lengths[0] is not None and d.block_lengths[2] is not None
    assert d.tokens_per_ms == pytest.approx(brute_force(cands, 4, Costs(0.15), [4, 8]))


@pytest.mark.parametrize("seed", range(12))
def test_decision_equals_brute_force_on_random_tables(seed):
    import random

    rng = random.Random(seed)
    cands = [Candidate(rng.random(), rng.choice([1, 3, 50])) for _ in range(rng.randint(1, 5))]
    costs, lengths = Costs(rng.choice([0.0, 0.05, 0.2, 0.6])), [4, 8, 16]
    fixed = (rng.randint(0, 3), rng.random() * 2)
    d = decide(cands, len(cands) + fixed[0], costs, lengths, *fixed)
    assert d.tokens_per_ms == pytest.approx(brute_force(cands, len(cands) + fixed[0], costs, lengths, *fixed))


@pytest.mark.parametrize("slope, fused_acceptance, want", [
    (0.01, 0.9, ("fused_spec", 8)),  # a pass of 40 tokens costs little more than one of 8: one forward per step wins
    (0.05, 0.9, ("spec", 8)),        # a 40-token pass costs too much: two forwards of 8 are cheaper
    (0.01, 0.2, ("spec", 8)),        # fused drafts rarely accepted: linear spec
])
def test_decision_weighs_fused_spec(slope, fused_acceptance, want):
    d = decide([Candidate(0.9, 100, fused_acceptance, in_fused=True)], 1, Costs(slope), [8], fused_subblocks=4)
    assert d.choices == [want]


def test_entering_fused_spec_is_costed_with_its_linear_first_step():
    """A sequence not yet in fused spec drafts linearly first: entering is worth less than staying, and is chosen
    only where the steps after it make up for that first step."""
    steady = decide([Candidate(0.9, 100, 0.9, in_fused=True)], 1, Costs(0.01), [8], fused_subblocks=4)
    enter = decide([Candidate(0.9, 100, 0.9, in_fused=False)], 1, Costs(0.01), [8], fused_subblocks=4)
    assert steady.choices == enter.choices == [("fused_spec", 8)]
    assert steady.tokens_per_ms > enter.tokens_per_ms
    poor = decide([Candidate(0.9, 100, 0.55, in_fused=False)], 1, Costs(0.01), [8], fused_subblocks=4)
    assert poor.choices == [("spec", 8)]  # fused drafts accepted much less: not worth entering


def test_short_remainders_do_not_speculate():
    assert decide([Candidate(1.0, 1)], 1, Costs(0.05), [8]).block_lengths == [None]


def test_acceptance_estimate_follows_verifies_and_returns_to_the_prior():
    est = AcceptanceEstimate(prior=0.5)
    assert est.value == 0.5
    for _ in range(6):
        est.observe(8, 8)   # every draft accepted
    high = est.value
    assert high > 0.9
    for _ in range(10):
        est.observe(1, 8)   # the first draft rejected
    assert est.value < 0.3
    for _ in range(300):
        est.observe_ar()
    assert est.value == pytest.approx(0.5, abs=0.02)
    assert expected_tokens(1.0, 8) == 8 and expected_tokens(0.0, 8) == 1
    assert expected_tokens(0.5, 3) == pytest.approx(1.75)


def test_pass_cost_table_drives_the_model(tmp_path):
    table = PassCostTable({("decode", 1, 1): 2.0, ("draft", 1, 8): 2.2, ("verify", 1, 8): 2.2})
    assert decide([Candidate(0.9, 100)], 1, table, [8]).block_lengths == [8]
    assert decide([Candidate(0.9, 100)], 1, DefaultCosts(), [8]).block_lengths == [8]  # 0.9: worth it even there
    assert decide([Candidate(0.4, 100)], 1, DefaultCosts(), [8]).block_lengths == [None]


def test_auto_config():
    assert mode_config("auto", 16) == AutoConfig((4, 8, 16))
    assert mode_config("auto", 12, use_lora=False) == AutoConfig((4, 8, 12), False)
    with pytest.raises(RequestError, match="fused_subblocks"):
        AutoConfig((4,), fused_subblocks=-1)
    assert mode_config("auto", 32, 2).block_lengths == (2,)
    with pytest.raises(RequestError, match="block_length >= 2"):
        mode_config("auto", 32, 1)


# ---- the engine ----------------------------------------------------------------------------------------

FLAT = Costs(0.0)  # block passes free: auto speculates wherever the prior acceptance says it pays


@pytest.mark.parametrize("costs, fused", [(FLAT, 4), (FLAT, 0), (Costs(1.0), 4)], ids=["flat", "flat-no-fused", "linear"])
def test_greedy_auto_equals_ar_and_counters_add_up(ckpt, costs, fused):
    lm = make_lm(ckpt)
    lm.engine.scheduler.costs = costs
    prompts = random_prompts([3, 9, 5, 14])
    ar = lm.ar_generate(prompts, max_new_tokens=21)
    auto = lm.run([lm.request(p, 21, AutoConfig((4, 8), fused_subblocks=fused)) for p in prompts])
    for a, b in zip(auto, ar):
        assert a.token_ids == b.token_ids and a.error is None
        choices = a.auto_choices
        spec_cycles = sum(v for k, v in choices.items() if k != "ar")  # linear cycles and fused steps
        # every choice runs its passes (one verify per spec cycle or fused step), except a last one whose seed
        # token already ends the request
        assert 0 <= choices.get("ar", 0) - a.forwards["decode"] <= 1
        assert 0 <= spec_cycles - a.forwards["verify"] <= 1 and a.forwards["draft"] <= a.forwards["verify"]
        assert choices.get("ar", 0) - a.forwards["decode"] + spec_cycles - a.forwards["verify"] <= 1
        assert set(choices) <= {"ar", "spec:4", "spec:8", "fused_spec:4", "fused_spec:8"}
        assert a.counters()["auto_choices"] == choices
        if costs is FLAT:  # free block passes: it speculates (one forward per fused step wins where it may)
            assert spec_cycles > 0 and any(k.startswith("fused_spec:" if fused else "spec:") for k in choices)
        else:
            assert spec_cycles == 0
    assert lm.cache.stats().num_free_pages == lm.cache.num_pages


def test_auto_mixes_with_other_modes_and_switches(ckpt):
    lm = make_lm(ckpt)
    lm.engine.scheduler.costs = FLAT
    prompts = random_prompts([4, 7, 6, 11], seed=3)
    ar = lm.ar_generate(prompts, max_new_tokens=24)
    reqs = [lm.request(prompts[0], 24, mode_config("auto", 8)),
            lm.request(prompts[1], 24, SpecConfig(4)),
            lm.request(prompts[2], 24, ARConfig(), switches=[(5, AutoConfig((4,))), (15, ARConfig())]),
            lm.request(prompts[3], 24, mode_config("auto", 8), switches=[(9, SpecConfig(8))])]
    out = lm.run(reqs + [lm.request(prompts[0], 24, DiffusionConfig(8))])
    for i in range(4):
        assert out[i].token_ids == ar[i].token_ids, f"request {i}"
    assert {"spec:4", "fused_spec:4"} & set(out[2].auto_choices) and out[2].forwards["decode"] >= 5 + 9
    assert out[3].auto_choices and sum(out[3].auto_choices.values()) <= 9 + 1


def test_sampled_auto_is_reproducible(ckpt):
    lm = make_lm(ckpt)
    lm.engine.scheduler.costs = FLAT
    req = lm.request(random_prompts([5])[0], 20, mode_config("auto", 8), temperature=0.8, seed=11)
    a, b = lm.run([req])[0], lm.run([req])[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20
    assert isinstance(req, GenerationRequest)


# ---- engine limits and cost tables ---------------------------------------------------------------------------

def _limited_lm(ckpt, max_batch: int, draft_tokens: int):
    from trimode.runtime import assembly
    from trimode.runtime.api import TriModeLM
    from trimode.runtime.executors.engine_dir import EngineLimits
    from trimode.runtime.model.checkpoint import load_model
    from trimode.runtime.settings import RuntimeSettings

    limits = EngineLimits("a small build", ("ar", "spec"), max_batch=max_batch, max_seq=96, block_length=8,
                          page_size=4, max_pages=128,
                          max_tokens={"prefill": 96, "decode": max_batch, "verify": max_batch * 9,
                                      "draft": draft_tokens})
    rt = assembly.build_runtime(load_model(ckpt), None, RuntimeSettings(num_pages=128, page_size=4,
                                                                        max_batch_size=max_batch), limits=limits)
    return TriModeLM.from_runtime(rt)


def test_fused_spec_within_an_engines_max_batch(ckpt):
    """An engine runs at most max_batch sequences per forward: a fused step's sub-blocks are draft passes, so
    more sub-blocks than that are refused by name, and a batch whose sub-blocks would exceed it waits a step
    instead of failing; auto's fused option shrinks to what fits instead of refusing auto."""
    from trimode.runtime.request import FusedSpecConfig

    lm = _limited_lm(ckpt, max_batch=2, draft_tokens=18)
    with pytest.raises(RequestError, match="num_subblocks"):
        lm.run([lm.request([5, 6, 7], 12, FusedSpecConfig(8, 4, 4))])
    prompts = random_prompts([4, 6, 5], seed=9)
    ar = lm.ar_generate(prompts, max_new_tokens=12)
    out = lm.run([lm.request(p, 12, FusedSpecConfig(4, 2, 2)) for p in prompts])
    assert [r.token_ids for r in out] == [r.token_ids for r in ar] and all(r.error is None for r in out)
    lm.engine.scheduler.costs = FLAT
    auto = lm.run([lm.request(p, 12, AutoConfig((4, 8))) for p in prompts])
    assert [r.token_ids for r in auto] == [r.token_ids for r in ar]
    assert lm.engine._auto_fused_subblocks(4, 8) == 2  # max_batch 2, 18 draft tokens / 8 = 2


def test_bad_cost_tables(tmp_path, ckpt, caplog):
    from trimode.runtime.scheduling import COSTS_FILE, CostTableError, load_costs

    with pytest.raises(CostTableError, match="missing"):
        PassCostTable.from_result({"passes": [{"kind": "decode", "batch": 1, "num_tokens": 1, "median_ms": 1.0}]})
    with pytest.raises(CostTableError, match="not a pass-cost profile"):
        PassCostTable.from_result({"passes": [{"kind": "decode"}]})
    (tmp_path / COSTS_FILE.format(executor="torch")).write_text("{not json")
    with caplog.at_level("WARNING", logger="trimode"):
        assert load_costs(tmp_path, "torch") is None  # ignored, said in one line: the runtime still loads
    assert "ignoring" in caplog.text
    # a table without denoise: a diffusion request beside auto ones harms nothing
    lm = make_lm(ckpt)
    lm.engine.scheduler.costs = PassCostTable({(k, 1, t): 1.0 + 0.01 * t for k in ("decode", "verify", "draft")
                                               for t in (1, 4, 8, 40)})
    prompts = random_prompts([5, 7], seed=4)
    out = lm.run([lm.request(prompts[0], 10, mode_config("auto", 8)), lm.request(prompts[1], 10, DiffusionConfig(4))])
    assert all(r.error is None for r in out)

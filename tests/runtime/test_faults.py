"""Request-level faults, by kind: numerically extreme sampling parameters, one sequence's failure (only it fails,
in the loop and served), an aborted ``Engine.run`` (nothing left behind), and an engine directory's build-time
limits (defaults, admission, per-forward budgets)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from trimode.runtime import assembly
from trimode.runtime.acceptance import rejection_accept
from trimode.runtime.api import TriModeLM
from trimode.runtime.cli.main import main
from trimode.runtime.executors.engine_dir import EngineLimits, EngineMismatch
from trimode.runtime.executors.engine_kinds import PASS_TO_KIND
from trimode.runtime.model.checkpoint import load_model
from trimode.runtime.request import ARConfig, DiffusionConfig, GenerationRequest, RequestError, SpecConfig
from trimode.runtime.sampling import NonFiniteLogits, SamplingError, SamplingParams, select_tokens, target_probs
from trimode.runtime.serving.engine_service import EngineService
from trimode.runtime.settings import RuntimeSettings

from build_helpers import BUILD_SCRIPT, SHIPPED, child_env
from conftest import make_lm, random_prompts

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tiny-kjv"
TINY = 1e-38


def _all_free(lm) -> bool:
    s = lm.cache.stats()
    return s.num_free_pages == s.num_pages and s.num_sequences == 0


def _nothing_left(lm) -> bool:
    e = lm.engine
    return not e.waiting and not e.running and not e.finished and _all_free(lm)


def _runs(lm):
    return {"ar": lambda p, **k: lm.ar_generate(p, **k),
            "diffusion": lambda p, **k: lm.generate(p, block_length=4, threshold=0.5, **k),
            "spec": lambda p, **k: lm.linear_spec_generate(p, block_length=4, **k)}


# ---- 1. extreme but valid sampling parameters -------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_tiny_temperature_is_the_greedy_limit_in_every_mode(ckpt, mode):
    lm = make_lm(ckpt)
    prompts = random_prompts([5, 9], seed=21)
    run = _runs(lm)[mode]
    greedy = [r.token_ids for r in run(prompts, max_new_tokens=14, eos_token_ids=())]
    for t in (TINY, 1e-45, 5e-324):  # float32's smallest normal, a float32 subnormal, the smallest double
        sampled = run(prompts, max_new_tokens=14, eos_token_ids=(), temperature=t, seed=1)
        assert [r.token_ids for r in sampled] == greedy, f"T={t}"
    assert _nothing_left(lm)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
@pytest.mark.parametrize("params", [dict(temperature=1e38), dict(temperature=1e308), dict(temperature=1.0, top_p=1e-30),
                                    dict(temperature=TINY, top_k=1), dict(temperature=1e308, top_p=5e-324, top_k=3)])
def test_extreme_sampling_parameters_produce_tokens(ckpt, mode, params):
    lm = make_lm(ckpt)
    res = _runs(lm)[mode](random_prompts([4, 7], seed=22), max_new_tokens=12, eos_token_ids=(), seed=3, **params)
    assert all(len(r.token_ids) == 12 and r.finish_reason == "length" for r in res)
    assert all(3 not in r.token_ids for r in res)  # the mask token is never drawn, even from a flat distribution
    assert _nothing_left(lm)


def test_target_probs_stay_a_distribution_for_extreme_values():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen).clamp(-3, 3) * torch.tensor([1e-3, 1.0, 1e4, 1e30, 1e38, 1.0])[:, None]
    logits[5, 7] = -float("inf")  # already-excluded tokens stay excluded
    for t in (TINY, 1e-45, 5e-324, 1e-3, 1.0, 1e38, 1e308):
        for top_p in (1.0, 0.5, 1e-30):
            probs = target_probs(logits, SamplingParams(t, top_k=0, top_p=top_p), mask_token_id=0)
            assert torch.isfinite(probs).all() and (probs >= 0).all(), (t, top_p)
            assert torch.allclose(probs.sum(-1), torch.ones(6)), (t, top_p)
            assert (probs[:, 0] == 0).all() and probs[5, 7] == 0
            if t <= TINY:  # the T -> 0 limit: all mass on the argmax
                assert torch.equal(probs.argmax(-1), logits[:, 1:].argmax(-1) + 1)
                assert (probs.max(-1).values == 1).all()


def test_rejection_sampling_with_one_hot_distributions():
    """T -> 0 makes draft and target one-hot: a wrong draft is rejected and the target's token drawn."""
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [0.0, 1.0, 5.0, 2.0], [0.0, 2.0, 1.0, 5.0]])
    params = SamplingParams(TINY)
    p = target_probs(logits, params, mask_token_id=0)
    q = target_probs(logits[[0, 0]], params, mask_token_id=0)  # drafts believe token 1 twice
    gen = torch.Generator().manual_seed(0)
    assert rejection_accept([1, 1], q, p, gen) == [1, 2]
    assert rejection_accept([1, 2], torch.stack([p[0], p[1]]), p, gen) == [1, 2, 3]


def test_non_finite_logits_raise_a_typed_error():
    for bad in (float("nan"), float("inf")):
        logits = torch.tensor([[0.0, 1.0, bad]])
        with pytest.raises(NonFiniteLogits):
            target_probs(logits, SamplingParams(1.0), mask_token_id=0)
    with pytest.raises(NonFiniteLogits):
        select_tokens(torch.tensor([[0.0, float("nan")]]), SamplingParams(), 0, None)


def test_extreme_seeds_and_step_counts(ckpt):
    """Other parameters at the edge of what the validators accept: the largest seed, a huge max_steps."""
    lm = make_lm(ckpt)
    prompts = random_prompts([4, 7], seed=28)
    res = lm.ar_generate(prompts, max_new_tokens=6, temperature=1.0, seed=(1 << 64) - 1)
    assert all(len(r.token_ids) == 6 for r in res)
    with pytest.raises(SamplingError, match=r"2\*\*64"):
        SamplingParams(1.0, seed=1 << 64)
    for policy, threshold in (("topk", None), ("threshold", 0.5), ("leftmost", None)):
        runs = [[r.token_ids for r in lm.generate(prompts, max_new_tokens=12, block_length=4, policy=policy,
                                                  threshold=threshold, max_steps=steps, eos_token_ids=())]
                for steps in (10**12, 4)]
        assert runs[0] == runs[1], policy  # more steps than masks reveal the same tokens
    assert _nothing_left(lm)


def test_cli_generate_with_a_tiny_temperature(capsys):
    assert main(["generate", "--model", str(MODEL), "--max-new-tokens", "6", "--temperature", "1e-38",
                 "--seed", "1", "In the beginning"]) == 0
    out = capsys.readouterr().out
    assert "6 tokens" in out


# ---- 1. one sequence's failure fails only that sequence ------------------------------------------------------

def _bad_request(mode=None) -> GenerationRequest:
    # a token id outside the vocabulary: its forward fails
    return GenerationRequest((5, 99_999, 7), 8, mode or ARConfig())


@pytest.mark.parametrize("mode", [ARConfig(), SpecConfig(4), DiffusionConfig(4, threshold=0.5)])
def test_a_failing_sequence_does_not_fail_its_batch(ckpt, mode):
    lm = make_lm(ckpt)
    prompts = random_prompts([6, 3], seed=23)
    alone = [r.token_ids for r in lm.run([lm.request(p, 10, mode, eos_token_ids=()) for p in prompts])]
    batch = [lm.request(prompts[0], 10, mode, eos_token_ids=()), _bad_request(mode),
             lm.request(prompts[1], 10, mode, eos_token_ids=())]
    res = lm.run(batch, raise_on_error=False)
    assert res[1].finish_reason == "error" and isinstance(res[1].exception, IndexError)
    assert [res[0].token_ids, res[2].token_ids] == alone
    assert res[0].finish_reason == res[2].finish_reason == "length"
    assert _nothing_left(lm)


def test_a_failing_callback_fails_only_its_sequence(ckpt):
    lm = make_lm(ckpt)
    prompts = random_prompts([4, 5, 6], seed=24)
    reqs = [lm.request(p, 9, SpecConfig(4), eos_token_ids=()) for p in prompts]
    alone = [r.token_ids for r in lm.run(reqs)]
    ids = []

    def on_tokens(seq_id, tokens):
        ids.append(seq_id)
        if seq_id == min(ids) + 1:  # the second request's client breaks
            raise ConnectionError("client went away")

    res = lm.run(reqs, on_tokens, raise_on_error=False)
    assert res[1].finish_reason == "error" and "client went away" in res[1].error
    assert [res[0].token_ids, res[2].token_ids] == [alone[0], alone[2]]
    assert _nothing_left(lm)


class _Sink:
    def __init__(self) -> None:
        self.ids, self.result, self.error = [], None, None
        self.done = threading.Event()

    def on_tokens(self, ids):
        self.ids.extend(ids)

    def on_finish(self, result, timing):
        self.result = result
        self.done.set()

    def on_error(self, message, code="INTERNAL"):
        self.error = message
        self.done.set()

    def is_cancelled(self):
        return False


def test_served_innocent_request_completes_next_to_a_failing_one(ckpt):
    lm = make_lm(ckpt)
    prompt = random_prompts([5], seed=25)[0]
    expected = lm.ar_generate([prompt], max_new_tokens=20, eos_token_ids=())[0].token_ids
    service = EngineService(lm)
    try:
        innocent, faulty = _Sink(), _Sink()
        service.submit(lm.request(prompt, 20, ARConfig(), eos_token_ids=()), innocent)
        service.submit(_bad_request(), faulty)
        assert innocent.done.wait(60) and faulty.done.wait(60)
        assert faulty.error and "IndexError" in faulty.error
        assert innocent.error is None and innocent.result.token_ids == expected
        assert service.wait_idle() and service.stats()["pages_used"] == 0
    finally:
        service.close()


# ---- 9. an aborted Engine.run leaves nothing behind -------------------------------------------------------

def test_interrupted_run_leaves_nothing(ckpt):
    lm = make_lm(ckpt)
    prompts = random_prompts([4, 6, 5], seed=26)
    calls = []

    def interrupt(seq_id, tokens):
        calls.append(seq_id)
        if len(calls) == 7:
            raise KeyboardInterrupt

    for mode in (ARConfig(), SpecConfig(4), DiffusionConfig(4, threshold=0.5)):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            lm.run([lm.request(p, 12, mode, eos_token_ids=()) for p in prompts], interrupt)
        assert _nothing_left(lm), mode
    # a short request finishes before the interrupt: its result must not stay either
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        lm.run([lm.request(prompts[0], 1, ARConfig()), lm.request(prompts[1], 30, ARConfig(), eos_token_ids=())],
               interrupt)
    assert _nothing_left(lm)
    assert len(lm.ar_generate(prompts[:1], max_new_tokens=5)[0].token_ids) == 5  # and it keeps serving


def test_refused_request_mid_list_leaves_nothing_queued(ckpt):
    lm = make_lm(ckpt)
    ok, too_long = lm.request([5, 6], 4, ARConfig()), lm.request([5, 6], 10**6 // 2, ARConfig())
    with pytest.raises(RequestError, match="positions"):
        lm.engine.run([ok, ok, too_long])
    assert _nothing_left(lm)
    # another caller's queued request is not touched by an aborted run, and still completes
    other = lm.engine.add_request(ok)
    with pytest.raises(RequestError):
        lm.engine.run([ok, too_long])
    assert [s.seq_id for s in lm.engine.waiting] == [other]
    while other not in lm.engine.finished:
        lm.engine.step()
    assert len(lm.engine.pop_result(other).token_ids) == 4 and _nothing_left(lm)


def test_executor_failure_aborts_cleanly(ckpt):
    """A forward that fails for a batch of one (nothing to isolate) fails that sequence; the API raises it."""
    lm = make_lm(ckpt)
    with pytest.raises(IndexError):
        lm.run([_bad_request(SpecConfig(4))])
    assert _nothing_left(lm)


# ---- 5. an engine directory's build-time limits -----------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    """engines/tiny-kjv as scripts/demo.sh builds it (block 16, max_seq 512; batch 8 and page size 16 by default:
    256 pages, 136 tokens per block forward), built here so that a clean checkout runs these tests too."""
    out = tmp_path_factory.mktemp("kjv-engine") / "engine"
    proc = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--model", str(SHIPPED), "--out", str(out),
                           "--block-length", "16", "--max-seq", "512", "--no-progress"],
                          capture_output=True, text=True, env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("executor", ["onnxruntime", "torch"])
def test_engine_limits_are_the_runtime_defaults(engine, executor):
    lm = TriModeLM.from_engine(engine, executor=executor)
    shapes = lm.engine_manifest["shapes"]
    assert lm.cache.num_pages == shapes["max_pages_total"] and lm.engine.max_batch_size == shapes["max_batch"]
    assert lm.cache.page_size == shapes["page_size"] and lm.default_block_length == shapes["block_length"]
    smaller = TriModeLM.from_engine(engine, executor=executor, num_pages=32, max_batch_size=2)
    assert smaller.cache.num_pages == 32 and smaller.engine.max_batch_size == 2


@pytest.mark.parametrize("change, field", [(dict(num_pages=1024), "shapes.max_pages_total"),
                                           (dict(max_batch_size=16), "shapes.max_batch"),
                                           (dict(settings=RuntimeSettings(num_pages=300)), "shapes.max_pages_total")])
def test_settings_beyond_the_engine_are_refused(engine, change, field):
    with pytest.raises(EngineMismatch, match=field.replace(".", r"\.")):
        TriModeLM.from_engine(engine, executor="torch", **change)


def test_batch_beyond_the_engine_queues_within_its_budgets(engine):
    """The issue's example: ten block-32 spec requests on a batch-8, block-16 engine. Each forward holds at
    most max_batch sequences and at most each engine kind's tokens per forward; results equal solo runs."""
    lm = TriModeLM.from_engine(engine, executor="torch")
    limits = lm.engine.limits
    seen = []
    forward = lm.executor.forward

    def recording(passes):
        seen.append(list(passes))
        return forward(passes)

    lm.executor.forward = recording
    prompts = ["In the beginning", "And God said", "Blessed are", "The LORD is", "And it came to pass"] * 2
    res = lm.linear_spec_generate(prompts, max_new_tokens=40, block_length=32, eos_token_ids=())
    assert all(len(r.token_ids) == 40 for r in res)
    assert max(len(p) for p in seen) <= limits.max_batch
    for passes in seen:
        for kind, most in limits.max_tokens.items():
            assert sum(p.num_tokens for p in passes if PASS_TO_KIND[p.kind] == kind) <= most, kind
    assert any(sum(p.num_tokens for p in s if p.kind.value == "verify") > 96 for s in seen)  # budgets were filled
    lm.executor.forward = forward
    solo = [lm.linear_spec_generate([p], max_new_tokens=40, block_length=32, eos_token_ids=())[0].token_ids
            for p in prompts[:5]]
    assert [r.token_ids for r in res[:5]] == solo == [r.token_ids for r in res[5:]]
    assert _nothing_left(lm)


def test_requests_beyond_the_engine_name_the_limit(engine):
    lm = TriModeLM.from_engine(engine, executor="torch")
    with pytest.raises(RequestError, match=r"draft pass of 200 tokens, more than the 136 tokens per forward"):
        lm.linear_spec_generate(["In the beginning"], max_new_tokens=300, block_length=200)
    with pytest.raises(RequestError, match=r"denoise pass of 150 tokens, more than the 136 tokens per forward"):
        lm.generate(["In the beginning"], max_new_tokens=300, block_length=150)
    assert _nothing_left(lm)


def test_limits_of_other_builds(ckpt):
    """Sequence length and modes: an engine built for max_seq 48 and AR only, over a random checkpoint."""
    limits = EngineLimits("an ar-only build", ("ar",), max_batch=2, max_seq=48, block_length=4, page_size=4,
                          max_pages=64, max_tokens={"prefill": 96, "decode": 2})
    rt = assembly.build_runtime(load_model(ckpt), None, RuntimeSettings(num_pages=64, page_size=4, max_batch_size=2),
                                limits=limits)
    lm = TriModeLM.from_runtime(rt)
    with pytest.raises(RequestError, match="max_seq = 48"):
        lm.ar_generate([[5] * 20], max_new_tokens=29)
    with pytest.raises(RequestError, match=r"mode 'spec' is not available.*\['ar'\]"):
        lm.linear_spec_generate([[5, 6]], max_new_tokens=8)
    with pytest.raises(RequestError, match="mode 'diffusion'"):  # a switch to a mode not built is refused too
        lm.run([lm.request([5, 6], 8, ARConfig(), switches=((4, DiffusionConfig(4)),))])
    res = lm.ar_generate(random_prompts([3, 4, 5, 6], seed=27), max_new_tokens=28, eos_token_ids=())
    assert all(len(r.token_ids) == 28 for r in res)  # four requests on a batch of two: they queue
    with pytest.raises(ValueError, match="max_batch"):
        assembly.build_runtime(load_model(ckpt), None, RuntimeSettings(max_batch_size=4), limits=limits)
    assert _nothing_left(lm)

"""Engines that decide (docs/kernels.md "Engines that decide"): greedy passes take ``draft_verify`` /
``confidence_unmask``'s decisions instead of logits. The tokens, and every counter, equal those of the same
engine returning logits, in every mode, batch 1 and 4, on random checkpoints and the shipped tiny-kjv; a greedy
step hands the host a few bytes per sequence instead of its logits; sampled passes still get logits.

The onnxruntime executor runs the reference graphs' own decision tails (build/onnx_graph.py): the same
comparisons on engine directories of a random checkpoint and of tiny-kjv, and against the torch executor.
"""

from pathlib import Path

import pytest

from build_helpers import finish, start_build
from trimode.runtime.api import TriModeLM
from trimode.runtime.passes import PassKind, PassOutput, SeqPass, split_outputs

from conftest import make_lm, random_prompts

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "tiny-kjv"
MODES = {
    "ar": lambda lm, p, n: lm.ar_generate(p, max_new_tokens=n, eos_token_ids=()),
    "diffusion-threshold": lambda lm, p, n: lm.generate(p, max_new_tokens=n, block_length=8, threshold=0.2,
                                                        eos_token_ids=()),
    "diffusion-topk": lambda lm, p, n: lm.generate(p, max_new_tokens=n, block_length=8, policy="topk",
                                                   eos_token_ids=()),
    "diffusion-leftmost": lambda lm, p, n: lm.generate(p, max_new_tokens=n, block_length=4, policy="leftmost",
                                                       eos_token_ids=()),
    "spec": lambda lm, p, n: lm.linear_spec_generate(p, max_new_tokens=n, block_length=8, eos_token_ids=()),
    "spec-threshold": lambda lm, p, n: lm.linear_spec_generate(p, max_new_tokens=n, block_length=8, threshold=0.3,
                                                               eos_token_ids=()),
    "fused_spec": lambda lm, p, n: lm.fused_spec_generate(p, max_new_tokens=n, block_length=8, eos_token_ids=()),
    "auto": lambda lm, p, n: lm.run([lm.request(q, n, _auto(), eos_token_ids=()) for q in p]),
}


def _auto():
    from trimode.runtime.request import mode_config

    return mode_config("auto", 8)


def _summary(results):
    return [(r.token_ids, r.forwards, r.accepted_lengths, r.revealed_per_step, r.finish_reason) for r in results]


def decided_and_not(lm, run, prompts, n):
    """(outputs with decisions, outputs with logits, output bytes of each run)."""
    out = {}
    for decide in (True, False):
        lm.engine.decide = decide
        before = lm.executor.output_bytes
        out[decide] = (_summary(run(lm, prompts, n)), lm.executor.output_bytes - before)
    lm.engine.decide = True
    return out[True], out[False]


@pytest.mark.parametrize("variant", ["gqa2-yarn-lora", "mha-default-rope", "gqa4-yarn-qscale"])
@pytest.mark.parametrize("batch", [1, 4])
def test_decisions_equal_logits_in_every_mode(checkpoints, variant, batch):
    lm = make_lm(checkpoints[variant])
    assert lm.executor.decides and lm.engine.decide
    prompts = random_prompts([9, 3, 14, 6][:batch], seed=batch)
    for mode, run in MODES.items():
        (decided, decided_bytes), (logits, logits_bytes) = decided_and_not(lm, run, prompts, 20)
        assert decided == logits, (variant, batch, mode)
        assert decided_bytes * 50 < logits_bytes, (mode, decided_bytes, logits_bytes)


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="the shipped tiny-kjv is not in this checkout")
@pytest.mark.parametrize("batch", [1, 4])
def test_decisions_equal_logits_on_tiny_kjv(batch):
    lm = make_lm(str(SHIPPED), page_size=16, num_pages=64)
    prompts = [lm.encode(t) for t in ("In the beginning God created", "And the LORD said unto Moses,",
                                      "Blessed are the poor in spirit:", "The LORD is my shepherd;")][:batch]
    for mode, run in MODES.items():
        (decided, _), (logits, _) = decided_and_not(lm, run, prompts, 24)
        assert decided == logits, (batch, mode)


def test_a_greedy_verify_step_moves_eight_bytes_per_sequence_not_its_logits(ckpt):
    """Bytes handed to the host by one verify forward of 4 sequences (block 8): with decisions 4 x (accepted +
    bonus) = 32; with logits 4 x 8 rows x V x 4 bytes."""
    lm = make_lm(ckpt)
    vocab, block = lm.config.vocab_size, 8
    prompts = random_prompts([9, 3, 14, 6], seed=3)
    cache, ex = lm.cache, lm.executor
    for sid, prompt in enumerate(prompts):
        cache.add_sequence(sid)
        cache.reserve(sid, len(prompt) + block)
    try:
        ex.forward([SeqPass(sid, PassKind.PREFILL, tuple(p), 0) for sid, p in enumerate(prompts)])
        moved = {}
        for decide in (True, False):
            verify = [SeqPass(sid, PassKind.VERIFY, tuple(range(5, 5 + block)), len(p), num_logits=block,
                              decide=decide) for sid, p in enumerate(prompts)]
            before = ex.output_bytes
            out = ex.forward(verify)
            moved[decide] = ex.output_bytes - before
            assert all((o.logits is None) == decide for o in out)
        assert moved[True] == 4 * 8
        assert moved[False] == 4 * block * vocab * 4
    finally:
        for sid in range(len(prompts)):
            cache.free(sid)


def test_sampled_passes_still_get_logits_and_greedy_ones_in_the_same_batch_decide(ckpt):
    lm = make_lm(ckpt)
    prompts = random_prompts([9, 5], seed=7)
    seen: list[list[SeqPass]] = []
    forward = lm.executor.forward

    def spy(passes):
        seen.append(list(passes))
        return forward(passes)

    lm.executor.forward = spy
    greedy = lm.request(prompts[0], 12, _spec(), eos_token_ids=())
    sampled = lm.request(prompts[1], 12, _spec(), temperature=0.8, seed=1, eos_token_ids=())
    lm.run([greedy, sampled])
    by_seq: dict[int, set[bool]] = {}
    for passes in seen:
        for p in passes:
            by_seq.setdefault(p.seq_id, set()).add(p.decide)
    assert sorted(by_seq.values(), key=len) == [{True}, {False}]  # one sequence always decided, one never
    assert any(len({p.seq_id for p in passes}) == 2 for passes in seen)  # and they shared forwards


def _spec(block: int = 8):
    from trimode.runtime.request import mode_config

    return mode_config("spec", block)


def test_split_outputs_assigns_rows_and_decisions_in_pass_order():
    import torch

    passes = [SeqPass(0, PassKind.DECODE, (5,), 3, decide=True),
              SeqPass(1, PassKind.VERIFY, (1, 2, 3), 7, num_logits=3),
              SeqPass(2, PassKind.DRAFT, (9, 9, 9), 4, num_logits=3, decide=True, decide_rows=(0, 2)),
              SeqPass(3, PassKind.VERIFY, (1, 2), 7, num_logits=2, decide=True)]
    logits = torch.arange(12.0).view(3, 4)
    out = split_outputs(passes, logits, [1, 2], [7, 8], [4, 5], [0.5, 0.25])
    assert out[0] == PassOutput(accepted=1, bonus=7) and out[3] == PassOutput(accepted=2, bonus=8)
    assert torch.equal(out[1].logits, logits)
    assert out[2].tokens.tolist() == [4, 5] and out[2].confidence.tolist() == [0.5, 0.25]
    assert [o.num_bytes for o in out] == [8, 48, 16, 8]


@pytest.fixture(scope="module")
def engines(checkpoints, tmp_path_factory):
    """Engine directories (ONNX stage) of a random checkpoint and, if shipped, tiny-kjv, built concurrently."""
    tmp = tmp_path_factory.mktemp("decide")
    procs = {"random": start_build(checkpoints["gqa2-yarn-lora"], tmp / "random", "none")}
    if (SHIPPED / "config.json").is_file():
        procs["tiny-kjv"] = start_build(SHIPPED, tmp / "kjv", "none", "--page-size", "16", "--max-seq", "256")
    for proc in procs.values():
        finish(proc)
    return {"random": tmp / "random", **({"tiny-kjv": tmp / "kjv"} if "tiny-kjv" in procs else {})}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["random", "tiny-kjv"])
@pytest.mark.parametrize("batch", [1, 4])
def test_onnxruntime_graph_decisions_equal_logits_and_torch(engines, which, batch):
    if which not in engines:
        pytest.skip("the shipped tiny-kjv is not in this checkout")
    lms = {ex: TriModeLM.from_engine(engines[which], executor=ex, **({"threads": 1} if ex == "onnxruntime" else {}))
           for ex in ("onnxruntime", "torch")}
    lm = lms["onnxruntime"]
    assert lm.executor.decides and lm.engine.decide
    if which == "random":
        prompts = random_prompts([9, 3, 14, 6][:batch], seed=batch)
    else:
        prompts = [lm.encode(t) for t in ("In the beginning God created", "And the LORD said unto Moses,",
                                          "Blessed are the poor in spirit:", "The LORD is my shepherd;")][:batch]
    for mode, run in MODES.items():
        (decided, decided_bytes), (logits, logits_bytes) = decided_and_not(lm, run, prompts, 16)
        assert decided == logits, (which, batch, mode)
        assert [t[0] for t in decided] == [t[0] for t in _summary(run(lms["torch"], prompts, 16))], (which, mode)
        assert decided_bytes * 50 < logits_bytes, (mode, decided_bytes, logits_bytes)


@pytest.mark.slow
def test_onnxruntime_greedy_verify_step_moves_eight_bytes_per_sequence(engines):
    lm = TriModeLM.from_engine(engines["random"], executor="onnxruntime", threads=1)
    prompts = random_prompts([9, 3, 14, 6], seed=3)
    cache, ex, block = lm.cache, lm.executor, 4
    for sid, prompt in enumerate(prompts):
        cache.add_sequence(sid)
        cache.reserve(sid, len(prompt) + block)
    try:
        ex.forward([SeqPass(sid, PassKind.PREFILL, tuple(p), 0) for sid, p in enumerate(prompts)])
        moved, got = {}, {}
        for decide in (True, False):
            verify = [SeqPass(sid, PassKind.VERIFY, tuple(range(5, 5 + block)), len(p), num_logits=block,
                              decide=decide) for sid, p in enumerate(prompts)]
            before = ex.output_bytes
            got[decide] = ex.forward(verify)
            moved[decide] = ex.output_bytes - before
        assert moved[True] == 4 * 8 and moved[False] == 4 * block * lm.config.vocab_size * 4
        # the graph's decision is draft_verify's over the logits the same graph returns
        from trimode.plugins.draft_verify import draft_verify_greedy_reference
        import torch

        target = torch.stack([o.logits for o in got[False]])
        drafts = torch.tensor([list(range(6, 5 + block))] * 4, dtype=torch.int32)
        accepted, bonus = draft_verify_greedy_reference(drafts, target, torch.full((4,), block - 1, dtype=torch.int32),
                                                        lm.config.mask_token_id)
        assert [(o.accepted, o.bonus) for o in got[True]] == list(zip(accepted.tolist(), bonus.tolist()))
    finally:
        for sid in range(len(prompts)):
            cache.free(sid)


class _Wrapped:
    """An executor around another one: ``decides`` as given; ``poison`` turns the confidences of deciding
    draft passes into NaN (a forward gone wrong)."""

    def __init__(self, inner, decides: bool, poison: bool = False) -> None:
        self.inner, self.cache, self.decides, self.poison = inner, inner.cache, decides, poison
        self.seen: list = []
        self.output_bytes = 0

    def forward(self, passes):
        import dataclasses
        import torch

        self.seen.extend(passes)
        assert self.decides or not any(p.decide for p in passes), "a deciding pass reached a non-deciding executor"
        out = self.inner.forward(passes)
        if self.poison:
            out = [dataclasses.replace(o, confidence=torch.full_like(o.confidence, float("nan")))
                   if o.confidence is not None else o for o in out]
        return out


def _engine_over(lm, executor, **kw):
    from trimode.runtime.engine import Engine

    return Engine(executor, lm.config.mask_token_id, lm.config.max_position_embeddings, **kw)


def test_an_executor_that_cannot_decide_never_gets_deciding_passes(ckpt):
    lm = make_lm(ckpt)
    prompts = random_prompts([9, 5], seed=11)
    want = [r.token_ids for r in lm.linear_spec_generate(prompts, max_new_tokens=12, block_length=4,
                                                         eos_token_ids=())]
    engine = _engine_over(lm, _Wrapped(lm.executor, decides=False), decide=True)
    assert engine.decide is False
    engine.decide = True  # asking again changes nothing
    assert engine.decide is False
    requests = [lm.request(p, 12, _spec(4), eos_token_ids=()) for p in prompts]
    assert [r.token_ids for r in engine.run(requests)] == want
    assert engine.executor.seen and not any(p.decide for p in engine.executor.seen)


def test_under_engine_limits_verify_passes_longer_than_the_built_block_take_logits(ckpt):
    """The engines' decision inputs are sized for the built block_length: a longer verify pass takes logits."""
    from trimode.runtime.executors.engine_dir import EngineLimits

    lm = make_lm(ckpt)
    limits = EngineLimits("test", ("ar", "spec"), max_batch=4, max_seq=128, block_length=4, page_size=4,
                          max_pages=256, max_tokens={})
    wrapped = _Wrapped(lm.executor, decides=True)
    engine = _engine_over(lm, wrapped, limits=limits, max_batch_size=4)
    prompts = random_prompts([9, 5], seed=12)
    requests = [lm.request(prompts[0], 12, _spec(8), eos_token_ids=()),
                lm.request(prompts[1], 12, _spec(4), eos_token_ids=())]
    got = [r.token_ids for r in engine.run(requests)]
    assert got == [r.token_ids for r in lm.ar_generate(prompts, max_new_tokens=12, eos_token_ids=())]
    verifies = [p for p in wrapped.seen if p.kind is PassKind.VERIFY]
    assert {p.decide for p in verifies if p.num_tokens > 5} == {False}
    assert {p.decide for p in verifies if p.num_tokens <= 5} == {True}


def test_nan_confidences_fail_that_request_alone(ckpt):
    from trimode.runtime.sampling import NonFiniteLogits

    lm = make_lm(ckpt)
    engine = _engine_over(lm, _Wrapped(lm.executor, decides=True, poison=True))
    prompts = random_prompts([9, 5], seed=13)
    diffusion = lm.request(prompts[0], 8, _diffusion(), eos_token_ids=())
    ar = lm.request(prompts[1], 8, _ar(), eos_token_ids=())
    bad, good = engine.run([diffusion, ar])
    assert bad.finish_reason == "error" and isinstance(bad.exception, NonFiniteLogits)
    assert good.finish_reason == "length"
    assert good.token_ids == lm.ar_generate([prompts[1]], max_new_tokens=8, eos_token_ids=())[0].token_ids


def _diffusion():
    from trimode.runtime.request import mode_config

    return mode_config("diffusion", 4)


def _ar():
    from trimode.runtime.request import mode_config

    return mode_config("ar", 1)

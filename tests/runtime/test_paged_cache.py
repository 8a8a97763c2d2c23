"""The paged cache against full recomputation, and what each pass kind may do to the pool."""

import pytest
import torch

from trimode.runtime.model.network import causal_mask
from trimode.runtime.passes import PassKind, SeqPass
from trimode.runtime.request import GenerationRequest, SpecConfig

from conftest import make_lm, random_prompts


def _run(lm, passes):
    for p in passes:
        if p.kind.keeps_kv:
            lm.cache.reserve(p.seq_id, p.end_pos)
    out = [o.logits for o in lm.executor.forward(passes)]
    for p in passes:
        if p.kind.keeps_kv:
            lm.cache.set_length(p.seq_id, p.end_pos)
    return out


@pytest.mark.parametrize("variant", ["gqa2-yarn-lora", "mha-default-rope", "gqa4-yarn-qscale"])
def test_paged_logits_equal_full_recompute(checkpoints, variant):
    lm = make_lm(checkpoints[variant], page_size=3)
    seqs = random_prompts([40, 23], seed=1)
    for sid in range(2):
        lm.cache.add_sequence(sid)
    # prefill, then chunks of 1 (decode) and 5 (verify), both sequences in every forward
    cuts = [0, 9, 10, 11, 16, 17, 22, 23]
    for a, b in zip(cuts, cuts[1:]):
        kind = PassKind.PREFILL if a == 0 else PassKind.DECODE if b - a == 1 else PassKind.VERIFY
        passes = [SeqPass(sid, kind, tuple(seqs[sid][a:b]), a, num_logits=b - a) for sid in range(2)]
        got = _run(lm, passes)
        for sid in range(2):
            ids = torch.tensor([seqs[sid][:b]])
            full = lm.model.forward_dense(ids, torch.arange(b)[None], causal_mask(b))[0, a:b]
            # fp32: 1e-5 relative to the logits' scale (random weights give |logits| up to ~10)
            err = (got[sid] - full).abs().max().item() / max(1.0, full.abs().max().item())
            assert err < 1e-5, f"{variant} seq {sid} positions {a}:{b}: max relative error {err:.2e}"


def test_block_bidirectional_pass_matches_dense_mask(ckpt):
    lm = make_lm(ckpt)
    ids = random_prompts([12], seed=2)[0]
    lm.cache.add_sequence(0)
    _run(lm, [SeqPass(0, PassKind.PREFILL, tuple(ids[:8]), 0)])
    got = _run(lm, [SeqPass(0, PassKind.DRAFT, tuple(ids[8:]), 8, num_logits=4, use_lora=True)])[0]
    allowed = causal_mask(12)
    allowed[8:, 8:] = True
    lora = torch.zeros(1, 12, dtype=torch.bool)
    lora[0, 8:] = True
    full = lm.model.forward_dense(torch.tensor([ids]), torch.arange(12)[None], allowed, lora)[0, 8:]
    assert (got - full).abs().max().item() < 1e-5
    no_lora = lm.model.forward_dense(torch.tensor([ids]), torch.arange(12)[None], allowed)[0, 8:]
    assert (got - no_lora).abs().max().item() > 1e-3, "the draft pass must apply the LoRA"


@pytest.mark.parametrize("kind", [PassKind.DRAFT, PassKind.DENOISE])
def test_unkept_pass_leaves_pool_bit_identical(ckpt, kind):
    lm = make_lm(ckpt)
    lm.cache.add_sequence(0)
    lm.cache.add_sequence(1)
    _run(lm, [SeqPass(0, PassKind.PREFILL, tuple(range(10, 27)), 0), SeqPass(1, PassKind.PREFILL, (5, 6, 7), 0)])
    k, v, stats = lm.cache.k_pool.clone(), lm.cache.v_pool.clone(), lm.cache.stats()
    tables = (lm.cache.block_table(0), lm.cache.block_table(1))
    _run(lm, [SeqPass(0, kind, (40, 3, 3, 3, 3, 3), 17, num_logits=6, use_lora=kind is PassKind.DRAFT),
              SeqPass(1, kind, (9, 3, 3), 3, num_logits=3)])
    assert torch.equal(k, lm.cache.k_pool) and torch.equal(v, lm.cache.v_pool)
    assert lm.cache.stats() == stats and (lm.cache.block_table(0), lm.cache.block_table(1)) == tables


def _cached_kv(lm, sid):
    n = lm.cache.length(sid)
    slots = lm.cache.slots(sid, 0, n)
    return [lm.cache.gather(layer, slots) for layer in range(lm.config.num_hidden_layers)]


@pytest.mark.parametrize("block_length", [4, 16])
def test_after_spec_pool_holds_causal_kv_of_the_text(ckpt, block_length):
    lm = make_lm(ckpt, page_size=4)
    prompts = random_prompts([6, 11], seed=3)
    eng = lm.engine
    ids = [eng.add_request(GenerationRequest(tuple(p), 200, SpecConfig(block_length))) for p in prompts]
    steps = 0
    while steps < 40 or any(s.policy_state is not None for s in eng.running):
        eng.step()
        steps += 1
    assert len(eng.running) == 2, "both requests must still be running"
    for seq in eng.running:
        text = list(seq.request.prompt_ids) + seq.generated[:-1]  # all but the pending token
        assert seq.pending == seq.generated[-1]
        assert lm.cache.length(seq.seq_id) == len(text)
        assert sum(seq.accepted_lengths) == len(seq.generated) - 1
        fresh = make_lm(ckpt, page_size=4)
        fresh.cache.add_sequence(0)
        _run(fresh, [SeqPass(0, PassKind.PREFILL, tuple(text), 0)])
        for layer, ((k, v), (k0, v0)) in enumerate(zip(_cached_kv(lm, seq.seq_id), _cached_kv(fresh, 0))):
            err = max((k - k0).abs().max().item(), (v - v0).abs().max().item())
            assert err < 1e-5, f"layer {layer}: cached K/V differ from a fresh prefill by {err:.2e}"
        assert lm.cache.block_table(seq.seq_id).__len__() == lm.cache.pages_for(len(text))
    for i in ids:
        eng.cancel(i)
    assert lm.cache.stats().num_free_pages == lm.cache.num_pages

"""Batch-invariant execution (runtime.model.network): a token's logits are bitwise the same whatever shares its
forward, so greedy self-speculation equals AR in every dtype, bf16 included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trimode.runtime.api import TriModeLM
from trimode.runtime.model.network import batch_invariant_attention
from trimode.runtime.passes import PassKind, SeqPass
from trimode.runtime.request import ARConfig, DiffusionConfig, SpecConfig

from conftest import make_lm, random_prompts

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-kjv"
PROMPTS = ["In the beginning", "And he said unto them,", "Blessed are the", "Hear, O Israel"]


def _decode_and_verify_logits(lm: TriModeLM, prompt: list[int], tokens: list[int], company: int) -> tuple:
    """Logits of ``tokens`` after ``prompt``: decoded one per forward, and verified in one pass (sharing the
    forward with ``company`` other sequences' prefills). Drives the executor directly; frees what it took."""
    ex, cache, n = lm.executor, lm.cache, len(tokens)
    others = [random_prompts([24 + 7 * i], vocab=lm.config.vocab_size, seed=i)[0] for i in range(company)]
    ids = [900, 901] + [902 + i for i in range(company)]
    for sid, length in zip(ids, [len(prompt) + n] * 2 + [len(o) for o in others]):
        cache.add_sequence(sid)
        cache.reserve(sid, length)
    try:
        for sid in ids[:2]:
            ex.forward([SeqPass(sid, PassKind.PREFILL, tuple(prompt), 0)])
            cache.set_length(sid, len(prompt))
        decoded = []
        for j, t in enumerate(tokens):
            decoded.append(ex.forward([SeqPass(ids[0], PassKind.DECODE, (t,), len(prompt) + j)])[0].logits[-1])
            cache.set_length(ids[0], len(prompt) + j + 1)
        passes = [SeqPass(sid, PassKind.PREFILL, tuple(o), 0) for sid, o in zip(ids[2:], others)]
        passes.insert(company // 2, SeqPass(ids[1], PassKind.VERIFY, tuple(tokens), len(prompt), num_logits=n))
        verified = ex.forward(passes)[company // 2].logits
        return torch.stack(decoded), verified
    finally:
        for sid in ids:
            cache.free(sid)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_do_not_depend_on_the_pass(dtype):
    lm = TriModeLM.from_pretrained(MODEL, dtype=dtype, num_pages=128).set_batch_invariant()
    prompt = list(lm.encode("And he said unto them,"))
    tokens = lm.ar_generate([prompt], max_new_tokens=16)[0].token_ids
    for company in (0, 3):  # alone, and inside a forward of 16 + ~100 rows (other GEMM shapes)
        decoded, verified = _decode_and_verify_logits(lm, prompt, tokens, company)
        assert torch.equal(decoded, verified), (f"{dtype}, {company} other sequences: max difference "
                                                f"{(decoded - verified).abs().max().item()}")
    assert lm.cache.stats().num_free_pages == lm.cache.num_pages


def test_default_mode_is_not_batch_invariant_in_float32():
    """What the mode is for: without it, a verify pass and decode passes round differently (a GEMM's reduction
    order depends on its shape), here by ~1e-5 in fp32; greedy tokens can then differ at a near-tie."""
    lm = TriModeLM.from_pretrained(MODEL, dtype="float32", num_pages=128)
    prompt = list(lm.encode("And he said unto them,"))
    tokens = lm.ar_generate([prompt], max_new_tokens=16)[0].token_ids
    decoded, verified = _decode_and_verify_logits(lm, prompt, tokens, 3)
    assert torch.allclose(decoded, verified, atol=1e-3)
    if torch.equal(decoded, verified):
        pytest.skip("this machine's float32 GEMMs happen to be shape-invariant here")


@pytest.mark.slow
def test_greedy_spec_equals_ar_in_bf16():
    lm = TriModeLM.from_pretrained(MODEL, dtype="bfloat16", num_pages=256).set_batch_invariant()
    ar = [r.token_ids for r in lm.ar_generate(PROMPTS, max_new_tokens=24)]
    for block in (4, 16):
        spec = [r.token_ids for r in lm.linear_spec_generate(PROMPTS, max_new_tokens=24, block_length=block)]
        assert spec == ar, f"block {block}"
    # and inside a mixed batch (other modes' passes in the same forwards), switching mode mid-way
    mixed = lm.run([lm.request(PROMPTS[0], 24, SpecConfig(16)), lm.request(PROMPTS[1], 24, DiffusionConfig(8)),
                    lm.request(PROMPTS[2], 24, ARConfig(), switches=((5, SpecConfig(8)),))])
    assert mixed[0].token_ids == ar[0] and mixed[2].token_ids == ar[2]


def test_batch_invariant_attention_matches_the_reference():
    """The row-wise attention computes the op of docs/kernels.md (compared with the plugin's reference)."""
    from trimode.plugins.paged_attention import paged_attention_reference

    gen = torch.Generator().manual_seed(0)
    page, hkv, hq, d = 4, 2, 4, 8
    k_pool, v_pool = torch.randn(10, page, hkv, d, generator=gen), torch.randn(10, page, hkv, d, generator=gen)
    tables = torch.tensor([[3, 1, 7, -1], [0, 2, 5, 9]], dtype=torch.int32)
    ctx = torch.tensor([6, 9], dtype=torch.int32)
    start = torch.tensor([0, 5, 8], dtype=torch.int32)
    q, k, v = (torch.randn(8, h, d, generator=gen) for h in (hq, hkv, hkv))
    for causal in (True, False):
        ours = batch_invariant_attention(q, k, v, k_pool, v_pool, tables, ctx, start, causal, 0.3)
        ref = paged_attention_reference(q, k, v, k_pool, v_pool, tables, ctx, start, causal, 0.3, page)
        assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_batch_invariant_mode_needs_the_torch_executor(ckpt):
    lm = make_lm(ckpt)
    lm.set_batch_invariant()
    res = lm.linear_spec_generate(random_prompts([5, 9], seed=3), max_new_tokens=12, block_length=4, eos_token_ids=())
    assert all(len(r.token_ids) == 12 for r in res)
    lm.settings = lm.settings.with_(executor="onnxruntime")
    with pytest.raises(ValueError, match="torch executor"):
        lm.set_batch_invariant()

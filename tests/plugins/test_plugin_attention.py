"""paged_attention and kv_append: the torch references against an independent dense computation, the Triton
kernels (in Triton's interpreter) against the references, and the torch executor running on the kernels.

Inputs are random and fresh each run; kernel outputs are poisoned (NaN) beforehand so unwritten rows fail.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: kernels run in its interpreter

import math  # noqa: E402

import pytest  # noqa: E402
import torch

from trimode.plugins import dispatch
from trimode.plugins.kv_append import kv_append_reference
from trimode.plugins.paged_attention import AttentionConfig, paged_attention_reference
from trimode.runtime.executors.torch_executor import TorchExecutor
from trimode.runtime.passes import PassKind, SeqPass

from conftest import make_lm, random_prompts
from plugin_helpers import PagedBatch, assert_close, interpreted


def dense_attention(batch: PagedBatch, is_causal: bool, scale: float) -> torch.Tensor:
    """Gather each sequence's keys, masked softmax in float64: the op's semantics written out directly."""
    num_q_heads, num_kv_heads = batch.q.shape[1], batch.k_new.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.empty(batch.q.shape, dtype=torch.float64)
    starts = batch.query_start.tolist()
    for s, length in enumerate(batch.context_lens.tolist()):
        a, b = starts[s], starts[s + 1]
        k = torch.cat([batch.k_seq[s], batch.k_new[a:b]]).double().repeat_interleave(group, dim=1)
        v = torch.cat([batch.v_seq[s], batch.v_new[a:b]]).double().repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,khd->htk", batch.q[a:b].double(), k) * scale
        if is_causal:  # query i sees keys < L + i + 1
            visible = torch.arange(length + b - a)[None, :] < (length + torch.arange(b - a) + 1)[:, None]
            scores = scores.masked_fill(~visible, -math.inf)
        out[a:b] = torch.einsum("htk,khd->thd", scores.softmax(-1), v)
    return out


@pytest.mark.parametrize("page_size,num_q_heads,num_kv_heads", [(16, 4, 4), (32, 8, 2), (64, 8, 1), (3, 4, 2)])
@pytest.mark.parametrize("is_causal", [True, False])
def test_reference_matches_dense_gather_softmax(page_size, num_q_heads, num_kv_heads, is_causal):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    context_lens = [0, page_size - 1, page_size, 3 * page_size + 5]  # empty, partial, full, many pages
    query_lens = [5, 1, 3, 16]
    batch = PagedBatch(context_lens, query_lens, num_q_heads, num_kv_heads, 16, page_size, gen=gen)
    got = paged_attention_reference(*batch.args(), is_causal, 0.25, page_size)
    assert_close(got, dense_attention(batch, is_causal, 0.25), 1e-5, "reference vs dense")


# dtype, page size, Hq, Hkv, head dim, causal, context lengths, query lengths, tiles (None: the launcher's choice)
KERNEL_CASES = {
    "fp32-p16-gqa4-causal": (torch.float32, 16, 8, 2, 16, True, [0, 37, 70], [5, 1, 9], AttentionConfig(32, 16)),
    "fp32-p32-mha-bidir-d24": (torch.float32, 32, 2, 2, 24, False, [65, 0], [3, 8], AttentionConfig(16, 32)),
    "fp16-p64-gqa8-causal": (torch.float16, 64, 8, 1, 16, True, [130, 5], [4, 2], None),
    "bf16-p16-gqa4-bidir": (torch.bfloat16, 16, 8, 2, 32, False, [40, 17, 0, 3], [1, 1, 2, 8],
                            AttentionConfig(16, 16)),
    "fp32-decode-p16-gqa4": (torch.float32, 16, 8, 2, 16, True, [50, 9, 31, 16], [1, 1, 1, 1],
                             AttentionConfig(16, 16)),
    "fp32-p3-tiny-model": (torch.float32, 3, 4, 2, 16, True, [7, 11], [2, 1], AttentionConfig(16, 16)),
    "fp32-split3-causal": (torch.float32, 16, 4, 2, 16, True, [100, 33], [2, 5], AttentionConfig(16, 16, num_splits=3)),
    "fp32-split4-bidir": (torch.float32, 16, 4, 2, 16, False, [0, 20], [3, 1], AttentionConfig(16, 16, num_splits=4)),
}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_attention_kernel_matches_reference(case):
    mod = interpreted("paged_attention")
    dtype, page_size, num_q_heads, num_kv_heads, head_dim, is_causal, context_lens, query_lens, cfg = \
        KERNEL_CASES[case]
    batch = PagedBatch(context_lens, query_lens, num_q_heads, num_kv_heads, head_dim, page_size, dtype=dtype)
    scale = head_dim ** -0.5
    want = paged_attention_reference(*batch.args(), is_causal, scale, page_size)
    out = torch.full_like(batch.q, math.nan)
    got = mod.paged_attention_triton(*batch.args(), is_causal, scale, page_size, config=cfg, out=out)
    assert got is out
    assert_close(got, want, TOLERANCE[dtype], f"{case}: kernel vs reference")


@pytest.mark.parametrize("new_dtype,pool_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float32, torch.bfloat16)])
def test_kv_append_kernel_writes_exactly_the_kept_slots(new_dtype, pool_dtype):
    mod = interpreted("kv_append")
    num_pages, page_size, num_kv_heads, head_dim = 6, 4, 2, 24
    k_pool = torch.randn(num_pages, page_size, num_kv_heads, head_dim).to(pool_dtype)
    v_pool = torch.randn_like(k_pool)
    k_new = torch.randn(7, num_kv_heads, head_dim).to(new_dtype)
    v_new = torch.randn(7, num_kv_heads, head_dim).to(new_dtype)
    slots = torch.randperm(num_pages * page_size)[:7]
    slots[[1, 4]] = -1  # not kept
    want_k, want_v = k_pool.clone(), v_pool.clone()
    kv_append_reference(k_new, v_new, want_k, want_v, slots)
    untouched = torch.ones(num_pages * page_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    before = k_pool.flatten(0, 1)[untouched].clone(), v_pool.flatten(0, 1)[untouched].clone()
    mod.kv_append_triton(k_new, v_new, k_pool, v_pool, slots)
    assert torch.equal(k_pool.flatten(0, 1)[untouched], before[0]), "a slot that is not written changed"
    assert torch.equal(v_pool.flatten(0, 1)[untouched], before[1]), "a slot that is not written changed"
    if new_dtype == pool_dtype:
        assert torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v), "pools differ from the reference"
    else:  # the interpreter rounds fp32 -> bf16 toward zero (GPUs round to nearest even, as torch does)
        assert_close(k_pool.float(), want_k.float(), 2 ** -7, "k_pool")
        assert_close(v_pool.float(), want_v.float(), 2 ** -7, "v_pool")


def test_torch_executor_on_the_kernels_matches_the_references(ckpt):
    """A mixed forward (causal decode/prefill next to a bidirectional LoRA draft) over page size 3."""
    interpreted("paged_attention"), interpreted("kv_append")
    lms = {name: make_lm(ckpt, page_size=3) for name in ("reference", "triton")}
    ids = random_prompts([8, 5], seed=7)
    logits = {}
    for name, lm in lms.items():
        executor = TorchExecutor(lm.model, lm.cache, kernels=name)
        for sid, prompt in enumerate(ids):
            lm.cache.add_sequence(sid)
            lm.cache.reserve(sid, len(prompt) + 1)
        out = [o.logits for o in executor.forward([SeqPass(0, PassKind.PREFILL, tuple(ids[0]), 0),
                                                   SeqPass(1, PassKind.PREFILL, tuple(ids[1]), 0, num_logits=2)])]
        for sid, prompt in enumerate(ids):
            lm.cache.set_length(sid, len(prompt))
        out += [o.logits for o in executor.forward([SeqPass(0, PassKind.DRAFT, (9, 3, 3, 3), 8, num_logits=4,
                                                            use_lora=True), SeqPass(1, PassKind.DECODE, (11,), 5)])]
        logits[name] = out
    for i, (got, want) in enumerate(zip(logits["triton"], logits["reference"])):
        assert_close(got, want, 1e-4, f"logits of pass {i}")
    for pool in ("k_pool", "v_pool"):
        assert_close(getattr(lms["triton"].cache, pool), getattr(lms["reference"].cache, pool), 1e-4, pool)


def test_backend_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve_backend(cpu) == "reference"
    assert dispatch.resolve_backend(torch.device("cuda")) == ("triton" if dispatch.triton_available() else "reference")
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.resolve_backend(torch.device("cuda")) == "reference"
    assert dispatch.resolve_backend(cpu, "triton" if dispatch.triton_available() else "reference") != "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="choose one of"):
        dispatch.resolve_backend(cpu)

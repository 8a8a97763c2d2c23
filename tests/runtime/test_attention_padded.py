"""The torch executor's batched CPU attention (``paged_attention_padded`` over a ``padded_layout`` built once per
forward) against the normative per-sequence reference, on random pools and ragged batches."""

from __future__ import annotations

import pytest
import torch

from trimode.plugins.paged_attention import padded_layout, paged_attention_padded, paged_attention_reference


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("context_lens, query_lens", [
    ([0], [5]),                    # a prefill: no prefix at all
    ([13], [1]),                   # one decode
    ([7, 0, 22, 3], [4, 4, 4, 4]),  # equal new tokens: no padding needed
    ([9, 30, 1], [1, 6, 3]),       # ragged: padded rows, uneven prefixes
])
def test_padded_attention_equals_the_reference(is_causal, context_lens, query_lens):
    gen = torch.Generator().manual_seed(sum(context_lens) + 7 * sum(query_lens) + is_causal)
    num_q_heads, num_kv_heads, head_dim, page_size, num_pages = 6, 2, 8, 4, 40
    k_pool = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=gen)
    v_pool = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=gen)
    # each sequence's pages: a random, disjoint set, wide enough for its prefix and new tokens (padding -1)
    order = torch.randperm(num_pages, generator=gen).tolist()
    widths = [-(-(c + q) // page_size) for c, q in zip(context_lens, query_lens)]
    tables = torch.full((len(widths), max(widths)), -1, dtype=torch.int32)
    for s, w in enumerate(widths):
        tables[s, :w] = torch.tensor(order[:w], dtype=torch.int32)
        order = order[w:]
    total = sum(query_lens)
    q = torch.randn(total, num_q_heads, head_dim, generator=gen)
    k_new = torch.randn(total, num_kv_heads, head_dim, generator=gen)
    v_new = torch.randn(total, num_kv_heads, head_dim, generator=gen)
    ctx = torch.tensor(context_lens, dtype=torch.int32)
    starts = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    want = paged_attention_reference(q, k_new, v_new, k_pool, v_pool, tables, ctx, starts, is_causal, 0.3, page_size)
    layout = padded_layout(tables, context_lens, query_lens, page_size, is_causal)
    got = paged_attention_padded(q, k_new, v_new, k_pool, v_pool, layout, 0.3)
    err = (got - want).abs()
    assert got.shape == want.shape and got.dtype == want.dtype
    assert err.max() < 1e-5, f"max |padded - reference| = {err.max():.2e}, mean {err.mean():.2e}"

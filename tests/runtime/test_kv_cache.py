import pytest
import torch

from trimode.runtime.kv_cache import KVCacheExhausted, PagedKVCache


def make(num_pages=8, page_size=4):
    return PagedKVCache(num_layers=2, num_kv_heads=2, head_dim=4, num_pages=num_pages, page_size=page_size)


def test_reserve_truncate_free_roundtrip():
    c = make()
    c.add_sequence(0)
    c.reserve(0, 10)
    assert len(c.block_table(0)) == 3 and c.stats().num_free_pages == 5
    c.set_length(0, 10)
    c.truncate(0, 5)
    assert c.length(0) == 5 and len(c.block_table(0)) == 2 and c.stats().num_free_pages == 6
    c.truncate(0, 0)
    assert c.block_table(0) == [] and c.stats().num_free_pages == 8
    c.free(0)
    c.free(0)  # idempotent
    assert c.stats().num_sequences == 0 and c.stats().num_free_pages == 8


def test_exhaustion_is_typed_and_changes_nothing():
    c = make(num_pages=4, page_size=4)
    c.add_sequence(0)
    c.add_sequence(1)
    c.reserve(0, 12)
    before = (c.block_table(0), c.block_table(1), c.stats())
    with pytest.raises(KVCacheExhausted) as e:
        c.reserve(1, 9)
    assert e.value.pages_needed == 3 and e.value.pages_free == 1
    assert "needs 3 more page(s)" in str(e.value) and "only 1 are free" in str(e.value)
    assert (c.block_table(0), c.block_table(1), c.stats()) == before


def test_slots_follow_block_table_and_write_gather():
    c = make(num_pages=8, page_size=4)
    c.add_sequence(0)
    c.add_sequence(1)
    c.reserve(1, 4)   # seq 1 takes page 0 so seq 0's pages are not contiguous from 0
    c.reserve(0, 7)
    table = c.block_table(0)
    slots = c.slots(0, 0, 7)
    assert slots.tolist() == [table[p // 4] * 4 + p % 4 for p in range(7)]
    k, v = torch.randn(7, 2, 4), torch.randn(7, 2, 4)
    c.write(1, slots, k, v)
    k2, v2 = c.gather(1, slots)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    assert torch.count_nonzero(c.k_pool[0]) == 0  # other layer untouched
    bt = c.block_table_tensor([0, 1])
    assert bt.shape == (2, 2) and bt[1, 1] == -1

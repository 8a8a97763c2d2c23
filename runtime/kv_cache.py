"""The paged KV cache: one page pool per model, shared by every mode, every engine kind and every request.

Layout (the contract with plugins/ and the exported graphs): ``k_pool`` and ``v_pool`` are
``[num_layers, num_pages, page_size, num_kv_heads, head_dim]``. A sequence owns a block table (a list of
page ids); token position ``p`` of the sequence lives in page ``table[p // page_size]`` at row
``p % page_size``, in every layer. The pool only ever holds ordinary causal K/V of committed tokens:
passes whose K/V is not kept (draft, denoise) never write to it.

Bookkeeping is all-or-nothing: ``reserve`` either gives a sequence all the pages it asked for or raises
``KVCacheExhausted`` and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCacheExhausted(RuntimeError):
    """Not enough free pages: says how many were asked for and how many are free."""

    def __init__(self, seq_id: int, pages_needed: int, pages_free: int, tokens: int, page_size: int) -> None:
        self.seq_id, self.pages_needed, self.pages_free = seq_id, pages_needed, pages_free
        super().__init__(f"KV cache exhausted: sequence {seq_id} needs {pages_needed} more page(s) "
                         f"(to hold {tokens} tokens, {page_size} per page) but only {pages_free} are free")


@dataclass(frozen=True)
class CacheStats:
    num_pages: int
    num_free_pages: int
    num_sequences: int
    num_tokens: int

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.num_free_pages

    @property
    def occupancy(self) -> float:
        return self.num_used_pages / self.num_pages


class PagedKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, page_size: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages and page_size must be positive, got {num_pages} and {page_size}")
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k_pool = torch.zeros(shape, dtype=dtype, device=device)
        self.v_pool = torch.zeros(shape, dtype=dtype, device=device)
        self.num_pages, self.page_size = num_pages, page_size
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}

    # ---- bookkeeping ----------------------------------------------------------------------------------

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def add_sequence(self, seq_id: int) -> None:
        assert seq_id not in self._tables, f"sequence {seq_id} already in the cache"
        self._tables[seq_id] = []
        self._lengths[seq_id] = 0

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def length(self, seq_id: int) -> int:
        """Number of committed tokens of the sequence (positions 0 .. length-1 hold valid K/V)."""
        return self._lengths[seq_id]

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._tables[seq_id])

    def pages_needed(self, seq_id: int, num_tokens: int) -> int:
        return max(0, self.pages_for(num_tokens) - len(self._tables[seq_id]))

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Make sure the sequence has pages for ``num_tokens`` tokens (all or nothing)."""
        need = self.pages_needed(seq_id, num_tokens)
        if need > len(self._free):
            raise KVCacheExhausted(seq_id, need, len(self._free), num_tokens, self.page_size)
        self._tables[seq_id].extend(self._free.pop() for _ in range(need))

    def set_length(self, seq_id: int, length: int) -> None:
        """Record that positions < ``length`` now hold committed K/V (after a kept pass wrote them)."""
        assert length <= len(self._tables[seq_id]) * self.page_size, (seq_id, length, self._tables[seq_id])
        self._lengths[seq_id] = length

    def truncate(self, seq_id: int, length: int) -> None:
        """Roll the sequence back to its first ``length`` tokens and free the pages past them."""
        assert 0 <= length <= self._lengths[seq_id], (seq_id, length, self._lengths[seq_id])
        self._lengths[seq_id] = length
        table = self._tables[seq_id]
        keep = self.pages_for(length)
        self._free.extend(reversed(table[keep:]))
        del table[keep:]

    def free(self, seq_id: int) -> None:
        """Give every page of the sequence back; unknown ids are ignored (freeing is idempotent)."""
        table = self._tables.pop(seq_id, None)
        self._lengths.pop(seq_id, None)
        if table:
            self._free.extend(reversed(table))

    def stats(self) -> CacheStats:
        return CacheStats(self.num_pages, len(self._free), len(self._tables), sum(self._lengths.values()))

    # ---- tensor access (used by the torch executor and the reference attention) ------------------------

    def slots(self, seq_id: int, start: int, count: int, device: torch.device | None = None) -> torch.Tensor:
        """Flat slot ids (page * page_size + row) of positions start .. start+count-1."""
        table = torch.tensor(self._tables[seq_id], dtype=torch.long)
        pos = torch.arange(start, start + count)
        slots = table[pos // self.page_size] * self.page_size + pos % self.page_size
        return slots.to(device or self.k_pool.device)

    def block_table_tensor(self, seq_ids: list[int], width: int | None = None) -> torch.Tensor:
        """Padded block tables [num_seqs, width] (int32, padding -1), the layout the kernels take."""
        width = width or max([len(self._tables[s]) for s in seq_ids] + [1])
        out = torch.full((len(seq_ids), width), -1, dtype=torch.int32)
        for i, s in enumerate(seq_ids):
            table = self._tables[s]
            out[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
        return out.to(self.k_pool.device)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [len(slots), num_kv_heads, head_dim] of the given slots in one layer."""
        k = self.k_pool[layer].flatten(0, 1).index_select(0, slots)
        v = self.v_pool[layer].flatten(0, 1).index_select(0, slots)
        return k, v

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_pool[layer].flatten(0, 1).index_copy_(0, slots, k.to(self.k_pool.dtype))
        self.v_pool[layer].flatten(0, 1).index_copy_(0, slots, v.to(self.v_pool.dtype))

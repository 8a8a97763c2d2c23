"""Helpers of the plugin tests: kernel modules under Triton's interpreter, error messages, paged test data."""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreted(name: str):
    """trimode.plugins.<name> with its kernels running in Triton's interpreter (skips without triton).

    TRITON_INTERPRET=1 must be set before triton itself is imported (its own library functions are @triton.jit
    too, and @triton.jit decides at decoration time): the plugin test modules set it first thing. A kernel module
    imported earlier without it is reloaded.
    """
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install triton): kernel tests skipped, references still run")
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl
    if type(tl.zeros).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (the plugin test modules set it at "
                    "their top): run the plugin tests in a fresh process")
    mod = importlib.import_module(f"trimode.plugins.{name}")
    if any(type(v).__name__ == "JITFunction" for v in vars(mod).values()):
        mod = importlib.reload(mod)
    return mod


def error_message(got: torch.Tensor, want: torch.Tensor, what: str) -> str:
    err = (got.double() - want.double()).abs()
    rel = err.max().item() / max(want.double().abs().max().item(), 1e-30)
    return (f"{what}: max abs error {err.max().item():.3e}, mean abs error {err.mean().item():.3e}, "
            f"max error relative to max |want| {rel:.3e}, NaNs {int(got.isnan().sum())}")


def assert_close(got: torch.Tensor, want: torch.Tensor, rel_tol: float, what: str) -> None:
    assert not got.isnan().any(), error_message(got, want, what + " (NaN: unwritten or invalid output)")
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rel_tol * max(want.double().abs().max().item(), 1.0), error_message(got, want, what)


class PagedBatch:
    """A ragged batch over a page pool holding each sequence's K/V prefix in random (non-contiguous) pages.

    ``k_seq[s]`` / ``v_seq[s]`` [L_s, Hkv, D] are the logical prefixes (for independent dense checks)."""

    def __init__(self, context_lens, query_lens, num_q_heads, num_kv_heads, head_dim, page_size,
                 dtype=torch.float32, gen: torch.Generator | None = None, spare_pages: int = 3) -> None:
        pages = [-(-(c + t) // page_size) for c, t in zip(context_lens, query_lens)]
        num_pages = sum(pages) + spare_pages
        rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
        self.k_pool, self.v_pool = rand(num_pages, page_size, num_kv_heads, head_dim), \
            rand(num_pages, page_size, num_kv_heads, head_dim)
        perm = torch.randperm(num_pages, generator=gen).tolist()
        width = max(pages) + 1  # one padding column (-1)
        self.block_tables = torch.full((len(pages), width), -1, dtype=torch.int32)
        for s, n in enumerate(pages):
            self.block_tables[s, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
        self.k_seq, self.v_seq = [], []
        for s, length in enumerate(context_lens):
            pos = torch.arange(length)
            slots = self.block_tables[s].long()[pos // page_size] * page_size + pos % page_size
            self.k_seq.append(self.k_pool.flatten(0, 1)[slots])
            self.v_seq.append(self.v_pool.flatten(0, 1)[slots])
        total = sum(query_lens)
        self.q = rand(total, num_q_heads, head_dim)
        self.k_new, self.v_new = rand(total, num_kv_heads, head_dim), rand(total, num_kv_heads, head_dim)
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32)
        self.query_start = torch.tensor([0] + list(query_lens), dtype=torch.int32).cumsum(0, dtype=torch.int32)
        self.page_size = page_size

    def args(self):
        return (self.q, self.k_new, self.v_new, self.k_pool, self.v_pool, self.block_tables, self.context_lens,
                self.query_start)

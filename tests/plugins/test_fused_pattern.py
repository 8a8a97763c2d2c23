"""The fused self-speculation pass (docs/kernels.md, "Fused self-speculation pass") built from the existing ops.

One forward holds, per sequence with L committed tokens, the draft chain c_0 .. c_{n-1} (positions L .. L+n-1,
causal, K/V kept) and K' sub-blocks of B' mask tokens (sub-block i at positions L+i+1 .. L+i+B': sees the prefix,
c_0 .. c_i and its own block, K/V not kept). The decomposition under test: ``kv_append`` writes the chain's K/V
first (sub-block tokens: slot -1), then ``paged_attention`` runs the chain causally with context_len L and every
sub-block as a block-bidirectional group of the same sequence with context_len L + i + 1.

Checked against an independent float64 computation of the quadratic mask: the torch references (a grid of GQA,
page sizes, ragged prefixes, n, K', B'), the Triton kernels in Triton's interpreter, a small stack of layers run
fused and run as two graphs (kept chain graph first; the other order is shown wrong), and the onnxruntime contrib
form of a plugin-form graph, which the real TensorRT-RTX builder then builds. Inputs are random, fresh each run.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: kernels run in its interpreter

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from trimode.plugins import dispatch  # noqa: E402

from plugin_helpers import assert_close, error_message, interpreted  # noqa: E402


class FusedBatch:
    """Random inputs of one layer's fused forward over a ragged batch: sequence s has ``context_lens[s]`` committed
    tokens in random pages of the pool, a chain of ``chain_len`` tokens (pages reserved for them) and
    ``num_blocks`` sub-blocks of ``block_len`` tokens (no pages). Tokens: all chains, then all sub-blocks."""

    def __init__(self, context_lens, chain_len, num_blocks, block_len, num_q_heads, num_kv_heads, head_dim,
                 page_size, gen=None, num_layers=1):
        assert 1 <= num_blocks <= chain_len, (num_blocks, chain_len)
        rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
        num_seqs, n, kb = len(context_lens), chain_len, num_blocks * block_len
        pages = [-(-(length + n) // page_size) for length in context_lens]
        num_pages = sum(pages) + 2  # spare pages: must stay untouched
        self.k_pools = rand(num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.v_pools = rand(num_layers, num_pages, page_size, num_kv_heads, head_dim)
        perm = torch.randperm(num_pages, generator=gen).tolist()
        self.block_tables = torch.full((num_seqs, max(pages) + 1), -1, dtype=torch.int32)
        for s, count in enumerate(pages):
            self.block_tables[s, :count] = torch.tensor([perm.pop() for _ in range(count)], dtype=torch.int32)
        self.q_chain, self.q_sub = rand(num_seqs * n, num_q_heads, head_dim), rand(num_seqs * kb, num_q_heads, head_dim)
        self.k_chain, self.v_chain = (rand(num_seqs * n, num_kv_heads, head_dim) for _ in "kv")
        self.k_sub, self.v_sub = (rand(num_seqs * kb, num_kv_heads, head_dim) for _ in "kv")
        # chain pass: one query group per sequence, context_len L
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32)
        self.chain_start = torch.arange(num_seqs + 1, dtype=torch.int32) * n
        pos = torch.tensor([length + j for length in context_lens for j in range(n)])
        seq = torch.arange(num_seqs).repeat_interleave(n)
        self.chain_slots = self.block_tables.long()[seq, pos // page_size] * page_size + pos % page_size
        # sub-block pass: one query group per (sequence, i), the sequence's block table, context_len L + i + 1
        self.sub_block_tables = self.block_tables.repeat_interleave(num_blocks, 0)
        self.sub_context_lens = torch.tensor([length + i + 1 for length in context_lens for i in range(num_blocks)],
                                             dtype=torch.int32)
        self.sub_start = torch.arange(num_seqs * num_blocks + 1, dtype=torch.int32) * block_len
        self.slot_mapping = torch.cat([self.chain_slots, torch.full((num_seqs * kb,), -1, dtype=torch.int64)])
        self.lens, self.n, self.num_blocks, self.block_len, self.page_size = \
            list(context_lens), n, num_blocks, block_len, page_size
        self.scale = head_dim ** -0.5

    def prefix(self, pools: torch.Tensor, s: int) -> torch.Tensor:
        """[L_s, Hkv, D]: sequence s's committed K or V of one layer's pool, gathered position by position."""
        rows = [pools[int(self.block_tables[s, p // self.page_size]), p % self.page_size] for p in range(self.lens[s])]
        return torch.stack(rows) if rows else pools.new_zeros(0, *pools.shape[2:])


def quadratic_mask(length: int, n: int, num_blocks: int, block_len: int) -> torch.Tensor:
    """Bool [n + K'B', L + n + K'B']: key visible to query, the pattern of the quadratic self-speculation pass.

    Queries: chain c_0 .. c_{n-1}, then sub-block 0, 1, ... (B' each). Keys: the L committed tokens, the chain,
    then the sub-blocks. Chain c_j sees the prefix and c_0 .. c_j; sub-block i sees the prefix, c_0 .. c_i and
    all of sub-block i (no other chain token, no other sub-block)."""
    kb = num_blocks * block_len
    chain = torch.arange(n)
    block = torch.arange(kb) // block_len  # sub-block of each sub-block token
    q_chain = torch.cat([chain, torch.full((kb,), -1)])  # chain index of the query (-1: a sub-block token)
    q_block = torch.cat([torch.full((n,), -1), block])  # its sub-block (-1: a chain token)
    last_chain_seen = torch.where(q_chain >= 0, q_chain, q_block)  # c_j sees c_0 .. c_j; sub-block i sees c_0 .. c_i
    sees_chain = chain[None, :] <= last_chain_seen[:, None]
    sees_block = (q_block[:, None] >= 0) & (block[None, :] == q_block[:, None])
    sees_prefix = torch.ones(n + kb, length, dtype=torch.bool)
    return torch.cat([sees_prefix, sees_chain, sees_block], 1)



@pytest.mark.parametrize("length,n,num_blocks,block_len", [(0, 1, 1, 1), (5, 4, 2, 4), (3, 8, 8, 8), (2, 8, 4, 1)])
def test_quadratic_mask_written_by_positions(length, n, num_blocks, block_len):
    """``quadratic_mask`` against the pattern stated with positions, one pair at a time: a chain query at position p
    sees committed keys and chain keys at positions <= p; a query of sub-block i sees committed keys, chain keys at
    positions <= L + i, and the keys of sub-block i."""
    queries = [("chain", length + j, None) for j in range(n)]
    queries += [("block", length + i + 1 + r, i) for i in range(num_blocks) for r in range(block_len)]
    keys = [("prefix", p, None) for p in range(length)] + [(kind, p, i) for kind, p, i in queries]
    want = torch.tensor([[k_kind == "prefix"
                          or (k_kind == "chain" and k_pos <= (q_pos if q_kind == "chain" else length + q_blk))
                          or (k_kind == "block" and q_kind == "block" and k_blk == q_blk)
                          for k_kind, k_pos, k_blk in keys] for q_kind, q_pos, q_blk in queries])
    assert torch.equal(quadratic_mask(length, n, num_blocks, block_len), want)

def dense_attention(q, k, v, visible, scale):
    """Masked softmax in float64: q [Tq, Hq, D], k/v [Tk, Hkv, D], visible [Tq, Tk] -> [Tq, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("thd,khd->htk", q.double(), k) * scale
    return torch.einsum("htk,khd->thd", scores.masked_fill(~visible, -math.inf).softmax(-1), v)


def dense_fused(b: FusedBatch, k_pool, v_pool):
    """(chain out, sub-block out) in float64: per sequence, every key of the forward under ``quadratic_mask``."""
    n, kb = b.n, b.num_blocks * b.block_len
    outs = []
    for s, length in enumerate(b.lens):
        c, sb = slice(s * n, (s + 1) * n), slice(s * kb, (s + 1) * kb)
        q = torch.cat([b.q_chain[c], b.q_sub[sb]])
        k = torch.cat([b.prefix(k_pool, s), b.k_chain[c], b.k_sub[sb]])
        v = torch.cat([b.prefix(v_pool, s), b.v_chain[c], b.v_sub[sb]])
        outs.append(dense_attention(q, k, v, quadratic_mask(length, n, b.num_blocks, b.block_len), b.scale))
    return torch.cat([o[:n] for o in outs]), torch.cat([o[n:] for o in outs])


def fused_forward(b: FusedBatch, q, k, v, k_pool, v_pool, backend="reference", attend=None):
    """One layer of the fused pass from the ops: kv_append over all tokens (sub-blocks: slot -1), then the chain
    (causal, context_len L) and the sub-blocks (bidirectional, context_len L + i + 1). q/k/v: (chain, sub-block)
    pairs. Returns (chain out, sub-block out); the pools are updated in place."""
    attend = attend or (lambda *a: dispatch.paged_attention(*a, backend=backend))
    dispatch.kv_append(torch.cat([k[0], k[1]]), torch.cat([v[0], v[1]]), k_pool, v_pool, b.slot_mapping,
                       backend=backend)
    chain = attend(q[0], k[0], v[0], k_pool, v_pool, b.block_tables, b.context_lens, b.chain_start, True, b.scale,
                   b.page_size)
    sub = attend(q[1], k[1], v[1], k_pool, v_pool, b.sub_block_tables, b.sub_context_lens, b.sub_start, False,
                 b.scale, b.page_size)
    return chain, sub


def layer_inputs(b: FusedBatch):
    return (b.q_chain, b.q_sub), (b.k_chain, b.k_sub), (b.v_chain, b.v_sub)


def assert_pool_holds_chain_only(b: FusedBatch, before: torch.Tensor, after: torch.Tensor, chain: torch.Tensor,
                                 what: str) -> None:
    """``after`` = ``before`` with the chain's rows written at its slots, bit for bit; nothing else changed."""
    want = before.clone().flatten(0, 1)
    want[b.chain_slots] = chain
    changed = (after.flatten(0, 1) != before.flatten(0, 1)).flatten(1).any(1).nonzero().flatten().tolist()
    assert torch.equal(after.flatten(0, 1), want), \
        f"{what}: rows changed {changed}, chain slots {b.chain_slots.tolist()}"


def fused_case(group: int, page_size: int, n: int, num_blocks: int, block_len: int):
    """Ragged prefixes: empty, a partial page and several pages (3 sequences; 2 for n = 4, in another order)."""
    lens = [0, page_size - 1, 3 * page_size + 2] if n != 4 else [2 * page_size + 1, 1]
    num_kv_heads = 2 if group < 4 else 1
    return lens, n, num_blocks, block_len, num_kv_heads * group, num_kv_heads


GRID = sorted({(g, p, n, k, bl) for g in (1, 2, 4) for p in (3, 16) for n in (1, 4, 8)
               for k in (1, n // 2, n) if k >= 1 for bl in (1, 4, n)})


@pytest.mark.parametrize("group,page_size,n,num_blocks,block_len", GRID)
def test_reference_composition_is_the_quadratic_pattern(group, page_size, n, num_blocks, block_len):
    """The torch references composed as docs/kernels.md says == the dense float64 quadratic pattern, for the chain
    and every sub-block; the pool gains exactly the chain's K/V (sub-block slots -1: never written)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    lens, n, kp, bl, hq, hkv = fused_case(group, page_size, n, num_blocks, block_len)
    b = FusedBatch(lens, n, kp, bl, hq, hkv, 16, page_size, gen)
    k_pool, v_pool = b.k_pools[0].clone(), b.v_pools[0].clone()
    chain, sub = fused_forward(b, *layer_inputs(b), k_pool, v_pool)
    want_chain, want_sub = dense_fused(b, b.k_pools[0], b.v_pools[0])
    assert_close(chain, want_chain, 1e-5, "chain outputs vs dense quadratic mask")
    assert_close(sub, want_sub, 1e-5, "sub-block outputs vs dense quadratic mask")
    assert_pool_holds_chain_only(b, b.k_pools[0], k_pool, b.k_chain, "k_pool")
    assert_pool_holds_chain_only(b, b.v_pools[0], v_pool, b.v_chain, "v_pool")


def test_attention_before_kv_append_is_wrong_for_the_sub_blocks():
    """The order is what makes it work: attention run before kv_append gives the same chain outputs (it reads its
    own K/V from k_new) but sub-blocks that read stale pool rows where c_0 .. c_i belong."""
    b = FusedBatch([5, 0], 4, 4, 2, 4, 2, 16, 3)
    k_pool, v_pool = b.k_pools[0].clone(), b.v_pools[0].clone()
    q, k, v = layer_inputs(b)
    attend = lambda *a: dispatch.paged_attention(*a, backend="reference")  # noqa: E731
    chain = attend(q[0], k[0], v[0], k_pool, v_pool, b.block_tables, b.context_lens, b.chain_start, True, b.scale)
    sub = attend(q[1], k[1], v[1], k_pool, v_pool, b.sub_block_tables, b.sub_context_lens, b.sub_start, False, b.scale)
    want_chain, want_sub = dense_fused(b, b.k_pools[0], b.v_pools[0])
    assert_close(chain, want_chain, 1e-5, "chain (attention first)")
    err = (sub.double() - want_sub).abs().max().item()
    assert err > 1e-2, f"attention-first sub-blocks unexpectedly match: {error_message(sub, want_sub, 'sub')}"


def kernels_vs_references(b: FusedBatch, attend, what: str) -> None:
    pools = {name: (b.k_pools[0].clone(), b.v_pools[0].clone()) for name in ("reference", "triton")}
    got = fused_forward(b, *layer_inputs(b), *pools["triton"], backend="triton", attend=attend)
    want = fused_forward(b, *layer_inputs(b), *pools["reference"])
    for g, w, part in zip(got, want, ("chain", "sub-blocks")):
        assert_close(g, w, 1e-4, f"{what}: {part}, kernels vs references")
    assert torch.equal(pools["triton"][0], pools["reference"][0]) and \
        torch.equal(pools["triton"][1], pools["reference"][1]), f"{what}: pools differ"


@pytest.mark.slow
@pytest.mark.parametrize("group,page_size,n,num_blocks,block_len", GRID)
def test_triton_kernels_compose_like_the_references(group, page_size, n, num_blocks, block_len):
    interpreted("paged_attention"), interpreted("kv_append")
    lens, n, kp, bl, hq, hkv = fused_case(group, page_size, n, num_blocks, block_len)
    kernels_vs_references(FusedBatch(lens, n, kp, bl, hq, hkv, 16, page_size), None, "dispatch 'triton'")


@pytest.mark.parametrize("lens,n,num_blocks,block_len", [([50, 20], 4, 4, 4), ([0, 70], 8, 3, 2)])
def test_split_kernels_read_the_chain_from_the_pool(lens, n, num_blocks, block_len):
    """The flash-decoding kernels (prefix split over 3 programs, merged after): the chain's rows that a sub-block
    reads from the pool are part of the split prefix."""
    mod = interpreted("paged_attention")
    interpreted("kv_append")
    cfg = mod.AttentionConfig(16, 16, num_splits=3)
    attend = lambda *a: mod.paged_attention_triton(*a, config=cfg)  # noqa: E731
    kernels_vs_references(FusedBatch(lens, n, num_blocks, block_len, 4, 2, 16, 16), attend, "3 splits")


# ---- a stack of layers: one fused graph, or the kept chain graph then the sub-block graph --------------------

def stack_weights(num_layers, hidden, num_q_heads, num_kv_heads, head_dim, gen):
    """Attention-only layers (x += attention(x Wq, x Wk, x Wv) Wo): enough to make each layer's K/V depend on the
    previous layer's outputs, which is what the order across graphs is about."""
    def w(rows, cols):
        return torch.randn(rows, cols, generator=gen) / math.sqrt(rows)
    return [(w(hidden, num_q_heads * head_dim), w(hidden, num_kv_heads * head_dim), w(hidden, num_kv_heads * head_dim),
             w(num_q_heads * head_dim, hidden)) for _ in range(num_layers)]


def qkv(x, layer, num_kv_heads, head_dim):
    wq, wk, wv, _ = layer
    return ((x @ wq).unflatten(1, (-1, head_dim)), (x @ wk).unflatten(1, (num_kv_heads, head_dim)),
            (x @ wv).unflatten(1, (num_kv_heads, head_dim)))


def run_fused_graph(b, weights, x_chain, x_sub, k_pools, v_pools, num_kv_heads, head_dim):
    """Every layer: kv_append first, then both attention passes (one graph holding both kinds of token)."""
    for layer, (k_pool, v_pool) in zip(weights, zip(k_pools, v_pools)):
        (qc, kc, vc), (qs, ks, vs) = qkv(x_chain, layer, num_kv_heads, head_dim), qkv(x_sub, layer, num_kv_heads,
                                                                                       head_dim)
        chain, sub = fused_forward(b, (qc, qs), (kc, ks), (vc, vs), k_pool, v_pool)
        x_chain, x_sub = x_chain + chain.flatten(1) @ layer[3], x_sub + sub.flatten(1) @ layer[3]
    return x_chain, x_sub


def run_chain_graph(b, weights, x, k_pools, v_pools, num_kv_heads, head_dim):
    """The K/V-keeping graph: the chain alone through every layer, its K/V appended."""
    for layer, (k_pool, v_pool) in zip(weights, zip(k_pools, v_pools)):
        q, k, v = qkv(x, layer, num_kv_heads, head_dim)
        dispatch.kv_append(k, v, k_pool, v_pool, b.chain_slots, backend="reference")
        out = dispatch.paged_attention(q, k, v, k_pool, v_pool, b.block_tables, b.context_lens, b.chain_start, True,
                                       b.scale, backend="reference")
        x = x + out.flatten(1) @ layer[3]
    return x


def run_sub_block_graph(b, weights, x, k_pools, v_pools, num_kv_heads, head_dim):
    """The graph that keeps nothing: the sub-blocks alone through every layer (kv_append with slot -1 everywhere,
    as the unified TensorRT engine calls it), reading the chain's K/V of each layer from the pool."""
    nowhere = torch.full((x.shape[0],), -1, dtype=torch.int64)
    for layer, (k_pool, v_pool) in zip(weights, zip(k_pools, v_pools)):
        q, k, v = qkv(x, layer, num_kv_heads, head_dim)
        dispatch.kv_append(k, v, k_pool, v_pool, nowhere, backend="reference")
        out = dispatch.paged_attention(q, k, v, k_pool, v_pool, b.sub_block_tables, b.sub_context_lens, b.sub_start,
                                       False, b.scale, backend="reference")
        x = x + out.flatten(1) @ layer[3]
    return x


def dense_stack(b, weights, x_chain, x_sub, num_kv_heads, head_dim):
    """float64, per sequence: all of its tokens through every layer under ``quadratic_mask``."""
    n, kb = b.n, b.num_blocks * b.block_len
    outs = []
    for s, length in enumerate(b.lens):
        x = torch.cat([x_chain[s * n:(s + 1) * n], x_sub[s * kb:(s + 1) * kb]]).double()
        visible = quadratic_mask(length, n, b.num_blocks, b.block_len)
        for i, layer in enumerate(weights):
            q, k, v = qkv(x, [w.double() for w in layer], num_kv_heads, head_dim)
            k = torch.cat([b.prefix(b.k_pools[i], s).double(), k])
            v = torch.cat([b.prefix(b.v_pools[i], s).double(), v])
            x = x + dense_attention(q, k, v, visible, b.scale).flatten(1) @ layer[3].double()
        outs.append(x)
    return torch.cat([o[:n] for o in outs]), torch.cat([o[n:] for o in outs])


@pytest.mark.parametrize("page_size,lens,n,num_blocks,block_len", [(3, [4, 0, 9], 4, 4, 4), (16, [20, 7], 8, 4, 2)])
def test_a_stack_of_layers_fused_or_as_two_graphs_in_kept_first_order(page_size, lens, n, num_blocks, block_len):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    num_layers, hidden, hq, hkv, d = 3, 24, 4, 2, 8
    b = FusedBatch(lens, n, num_blocks, block_len, hq, hkv, d, page_size, gen, num_layers=num_layers)
    weights = stack_weights(num_layers, hidden, hq, hkv, d, gen)
    x_chain, x_sub = torch.randn(len(lens) * n, hidden, generator=gen), \
        torch.randn(len(lens) * num_blocks * block_len, hidden, generator=gen)
    want_chain, want_sub = dense_stack(b, weights, x_chain, x_sub, hkv, d)

    fused_pools = b.k_pools.clone(), b.v_pools.clone()
    chain, sub = run_fused_graph(b, weights, x_chain, x_sub, *fused_pools, hkv, d)
    assert_close(chain, want_chain, 1e-5, "fused graph: chain vs dense")
    assert_close(sub, want_sub, 1e-5, "fused graph: sub-blocks vs dense")

    pools = b.k_pools.clone(), b.v_pools.clone()
    chain2 = run_chain_graph(b, weights, x_chain, *pools, hkv, d)
    sub2 = run_sub_block_graph(b, weights, x_sub, *pools, hkv, d)
    assert_close(chain2, chain, 1e-6, "two graphs vs fused: chain")
    assert_close(sub2, sub, 1e-6, "two graphs vs fused: sub-blocks")
    assert torch.equal(pools[0], fused_pools[0]) and torch.equal(pools[1], fused_pools[1]), \
        "the two graphs left other pools than the fused graph"

    stale = b.k_pools.clone(), b.v_pools.clone()  # the sub-block graph first: the chain's K/V not there yet
    sub3 = run_sub_block_graph(b, weights, x_sub, *stale, hkv, d)
    assert (sub3.double() - want_sub).abs().max().item() > 1e-2, "sub-block graph first unexpectedly right"


# ---- the ONNX forms: onnxruntime contrib ops, and the same plugin-form graph built by TensorRT-RTX -----------

GRAPH_INPUTS = ("q_chain", "k_chain", "v_chain", "q_sub", "k_sub", "v_sub", "k_pool", "v_pool", "slot_mapping",
                "block_tables", "context_lens", "chain_start", "sub_block_tables", "sub_context_lens", "sub_start")


def graph_feeds(b: FusedBatch) -> dict:
    values = (b.q_chain, b.k_chain, b.v_chain, b.q_sub, b.k_sub, b.v_sub, b.k_pools[0], b.v_pools[0], b.slot_mapping,
              b.block_tables, b.context_lens, b.chain_start, b.sub_block_tables, b.sub_context_lens, b.sub_start)
    return {name: t.contiguous().numpy() for name, t in zip(GRAPH_INPUTS, values)}


def fused_graph(b: FusedBatch):
    """Plugin-form ONNX model of one layer's fused pass (domain ``trimode``, as the engine graphs carry the ops):
    the chain's and the sub-blocks' K/V concatenated into ``kv_append`` (sub-block slots -1), then the chain's causal
    and the sub-blocks' bidirectional ``paged_attention``, both reading the pools ``kv_append`` returns (kv-first:
    the order is a data dependency). Outputs: out_chain, out_sub, k_pool_out, v_pool_out."""
    from onnx import TensorProto, helper

    from trimode.build.plugin_ops import plugin_attributes

    f, i32, i64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
    hq, (_, page, hkv, d) = b.q_chain.shape[1], b.k_pools[0].shape
    dims = {"q": (f, [hq, d]), "k": (f, [hkv, d]), "v": (f, [hkv, d])}
    inputs = [helper.make_tensor_value_info(f"{x}_{part}", dims[x][0], [f"T_{part}", *dims[x][1]])
              for part in ("chain", "sub") for x in "qkv"]
    inputs += [helper.make_tensor_value_info(name, f, ["P", page, hkv, d]) for name in ("k_pool", "v_pool")]
    inputs += [helper.make_tensor_value_info("slot_mapping", i64, ["T"])]
    for prefix, seqs in (("", "S"), ("sub_", "G")):
        inputs += [helper.make_tensor_value_info(f"{prefix}block_tables", i32, [seqs, "W"]),
                   helper.make_tensor_value_info(f"{prefix}context_lens", i32, [seqs]),
                   helper.make_tensor_value_info(f"{'chain_' if not prefix else prefix}start", i32, [f"{seqs}1"])]
    assert [i.name for i in inputs] == list(GRAPH_INPUTS)
    attention = dict(scale=float(b.scale), page_size=page, domain="trimode", **plugin_attributes("paged_attention"))
    nodes = [helper.make_node("Concat", ["k_chain", "k_sub"], ["k_all"], axis=0),
             helper.make_node("Concat", ["v_chain", "v_sub"], ["v_all"], axis=0),
             helper.make_node("kv_append", ["k_all", "v_all", "k_pool", "v_pool", "slot_mapping"],
                              ["k_pool_out", "v_pool_out"], name="kv_append", domain="trimode",
                              **plugin_attributes("kv_append")),
             helper.make_node("paged_attention", ["q_chain", "k_chain", "v_chain", "k_pool_out", "v_pool_out",
                                                  "block_tables", "context_lens", "chain_start"], ["out_chain"],
                              name="attention_chain", is_causal=1, **attention),
             helper.make_node("paged_attention", ["q_sub", "k_sub", "v_sub", "k_pool_out", "v_pool_out",
                                                  "sub_block_tables", "sub_context_lens", "sub_start"], ["out_sub"],
                              name="attention_sub_blocks", is_causal=0, **attention)]
    outputs = [helper.make_tensor_value_info("out_chain", f, ["T_chain", hq, d]),
               helper.make_tensor_value_info("out_sub", f, ["T_sub", hq, d]),
               helper.make_tensor_value_info("k_pool_out", f, ["P", page, hkv, d]),
               helper.make_tensor_value_info("v_pool_out", f, ["P", page, hkv, d])]
    return helper.make_model(helper.make_graph(nodes, "fused_self_speculation", inputs, outputs),
                             opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("trimode", 1)])


ONNX_CASES = {"mha-p3-n4": ([0, 4, 10], 4, 2, 4, 2, 2, 3), "gqa4-p16-n8-b1": ([37, 2], 8, 8, 1, 4, 1, 16)}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ONNX_CASES))
def test_onnxruntime_contrib_form_of_the_fused_graph(case):
    pytest.importorskip("onnxruntime_extensions")
    from trimode.build.plugin_ops import contrib_session
    from trimode.build.trt_compile import wire_kv_first

    lens, n, num_blocks, block_len, hq, hkv, page_size = ONNX_CASES[case]
    b = FusedBatch(lens, n, num_blocks, block_len, hq, hkv, 16, page_size)
    model = fused_graph(b)
    order = [node.name for node in model.graph.node]
    assert [node.name for node in wire_kv_first(model).graph.node] == order  # already wired as the engines are
    got = contrib_session(model).run(None, graph_feeds(b))
    k_pool, v_pool = b.k_pools[0].clone(), b.v_pools[0].clone()
    want = fused_forward(b, *layer_inputs(b), k_pool, v_pool)
    dense = dense_fused(b, b.k_pools[0], b.v_pools[0])
    for g, w, dw, what in zip(got, want, dense, ("chain", "sub-blocks")):
        assert_close(torch.from_numpy(g), w, 1e-6, f"{case}: onnxruntime {what} vs torch reference")
        assert_close(torch.from_numpy(g), dw, 1e-5, f"{case}: onnxruntime {what} vs dense quadratic mask")
    assert torch.equal(torch.from_numpy(got[2]), k_pool) and torch.equal(torch.from_numpy(got[3]), v_pool)
    assert_pool_holds_chain_only(b, b.k_pools[0], torch.from_numpy(got[2]), b.k_chain, f"{case}: k_pool_out")


@pytest.mark.slow
def test_tensorrt_rtx_builds_the_fused_plugin_graph(tmp_path):
    """The plugin form of the same graph, parsed and built for SM121 by the real TensorRT-RTX builder (in a child
    process with libtensorrt_rtx.so on its loader path, as the builder tests do), kv_append aliasing the pools."""
    from trimode.build.trt_compile import tensorrt_status
    from trimode.plugins import tensorrt_libs

    usable, why = tensorrt_status("spark")
    if not usable:
        pytest.skip(f"TensorRT-RTX cannot build here: {why}")
    b = FusedBatch([5, 0, 12], 4, 2, 4, 4, 2, 16, 3)
    path = tmp_path / "fused.plugin.onnx"
    path.write_bytes(fused_graph(b).SerializeToString())
    shapes = {name: list(x.shape) for name, x in graph_feeds(b).items()}
    (tmp_path / "shapes.json").write_text(json.dumps(shapes))
    env = tensorrt_libs.child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(path), str(tmp_path / "shapes.json")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"child failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["built"] and report["targets"] == ["SM121"], report
    assert report["layers"] == ["PLUGIN_V3", "PLUGIN_V3", "PLUGIN_V3"], report
    assert report["outputs"] == {"out_chain": "FLOAT", "out_sub": "FLOAT", "k_pool_out": "FLOAT",
                                 "v_pool_out": "FLOAT"}, report


def build_with_tensorrt_rtx(model_path: str, shapes_path: str) -> dict:
    """Child process: parse and build the plugin-form graph; every dimension but the head shapes and the page size
    dynamic (profile: 1 .. the given size .. twice it)."""
    from trimode.plugins import tensorrt_libs, trt_plugins

    trt = tensorrt_libs.import_tensorrt("tensorrt-rtx")
    trt_plugins.register(trt)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(Path(model_path).read_bytes()), [str(parser.get_error(k)) for k in range(parser.num_errors)]
    config = builder.create_builder_config()
    config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM121, 0)
    profile = builder.create_optimization_profile()
    for name, shape in json.loads(Path(shapes_path).read_text()).items():
        fixed = list(network.get_input([network.get_input(k).name for k in range(network.num_inputs)].index(name))
                     .shape)
        profile.set_shape(name, [1 if f < 0 else s for f, s in zip(fixed, shape)], shape,
                          [2 * s if f < 0 else s for f, s in zip(fixed, shape)])
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    layers = [network.get_layer(k).type.name for k in range(network.num_layers)]
    return {"built": plan is not None,
            "targets": tensorrt_libs.rtx_plan_header(bytes(plan))["targets"] if plan is not None else None,
            "layers": [t for t in layers if t.startswith("PLUGIN")],
            "outputs": {network.get_output(k).name: network.get_output(k).dtype.name
                        for k in range(network.num_outputs)}}


if __name__ == "__main__":
    print(json.dumps(build_with_tensorrt_rtx(*sys.argv[1:3])))

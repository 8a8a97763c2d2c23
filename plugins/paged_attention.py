"""``paged_attention``: the T_s new queries of each sequence attend to its L committed keys in the paged KV pool
(through its block table) and to its own T_s new keys. Causal (query i sees keys < L + i + 1) or
block-bidirectional (all L + T_s keys); GQA; ragged batches. Op contract: docs/kernels.md.

Kernel: one program per (block of BLOCK_Q query tokens of one sequence, KV head); its BLOCK_M rows are the
(token, query head) pairs of the head group, so K/V tiles are read once per group. Keys are visited in tiles of
BLOCK_N gathered through the block table (any page size), scores in fp32 with an online (exp2) softmax; no score
matrix is materialised. Long prefixes with too few programs to fill the GPU are split over several programs
(flash-decoding) and merged by a second kernel. The TensorRT AOT plugin launches the single-pass kernel (a QDP
AOT plugin is one kernel launch with no workspace). Head dims need not be powers of two (padded tiles, masked).
"""

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from trimode.plugins._common import FLOAT_DTYPES, TRITON_DTYPE, KernelArgumentError, check, check_launch, \
    compile_ptx, is_interpreted, next_pow2, tl, torch_dtype_of, triton
from trimode.plugins.signatures import autotune_io

PLUGIN_ID = "trimode::paged_attention"


# ---- reference ---------------------------------------------------------------------------------------------

def attend_dense(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_prefix: torch.Tensor,
                 v_prefix: torch.Tensor, is_causal: bool, scale: float) -> torch.Tensor:
    """One sequence: q [T, Hq, D] over [prefix ; new] keys (k/v_prefix [L, Hkv, D]); fp32 math, q's dtype out."""
    k = torch.cat([k_prefix.float(), k_new.float()]).transpose(0, 1)
    v = torch.cat([v_prefix.float(), v_new.float()]).transpose(0, 1)
    num_new, num_prefix = q.shape[0], k_prefix.shape[0]
    mask = None
    if is_causal:
        mask = torch.ones(num_new, num_prefix + num_new, dtype=torch.bool, device=q.device)
        mask[:, num_prefix:] = torch.ones(num_new, num_new, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1), k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out.transpose(0, 1).to(q.dtype)


def paged_attention_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor,
                              v_pool: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                              query_start: torch.Tensor, is_causal: bool, scale: float,
                              page_size: Optional[int] = None) -> torch.Tensor:
    """out [T_total, Hq, D] (q's dtype). Pools are one layer: [num_pages, page_size, Hkv, D]."""
    _check(q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start, page_size)
    page = k_pool.shape[1]
    out = torch.empty_like(q)
    starts, lengths = query_start.tolist(), context_lens.tolist()
    for s, length in enumerate(lengths):
        a, b = starts[s], starts[s + 1]
        pos = torch.arange(length, device=q.device)
        slots = block_tables[s].long()[pos // page] * page + pos % page
        k_prefix = k_pool.reshape(-1, *k_pool.shape[2:]).index_select(0, slots)
        v_prefix = v_pool.reshape(-1, *v_pool.shape[2:]).index_select(0, slots)
        out[a:b] = attend_dense(q[a:b], k_new[a:b], v_new[a:b], k_prefix, v_prefix, is_causal, scale)
    return out


@dataclass(frozen=True)
class PaddedLayout:
    """The ragged batch of one ``paged_attention`` call laid out per sequence, for ``paged_attention_padded``.
    Built once per forward (``padded_layout``) and shared by every layer: N sequences, each padded to ``max_len``
    new tokens and ``max_context`` prefix keys."""

    num_seqs: int
    max_len: int  # Tmax: the longest run of new tokens
    max_context: int  # C: the longest committed prefix
    prefix_slots: torch.Tensor  # [N * C] int64: flat pool rows of each sequence's prefix (0 past its length)
    pad_gather: Optional[torch.Tensor]  # [N * Tmax] int64: token of each padded row (None: identity)
    unpad_index: Optional[torch.Tensor]  # [T] int64: padded row of each token (None: identity)
    mask: torch.Tensor  # [N, 1, Tmax, C + Tmax] bool: key visible to query


def padded_layout(block_tables: torch.Tensor, context_lens: List[int], query_lens: List[int], page_size: int,
                  is_causal: bool) -> PaddedLayout:
    """The ``PaddedLayout`` of sequences with committed prefixes ``context_lens`` and ``query_lens`` new tokens
    (host ints), whose pages are ``block_tables`` [N, max_pages] (int32, on the pool's device)."""
    device = block_tables.device
    num_seqs, max_len, max_context = len(query_lens), max(query_lens), max(context_lens)
    ctx = torch.tensor(context_lens, device=device)
    pos = torch.arange(max_context, device=device)
    pages = block_tables.long()[:, pos // page_size] if max_context else pos.new_zeros(num_seqs, 0)
    prefix_ok = pos[None, :] < ctx[:, None]  # [N, C]
    prefix_slots = torch.where(prefix_ok, pages * page_size + pos % page_size, 0).reshape(-1)
    lens = torch.tensor(query_lens, device=device)
    j = torch.arange(max_len, device=device)
    new_ok = (j[None, :] < lens[:, None])[:, None, :]  # [N, 1, Tmax] (key j)
    if is_causal:
        new_ok = new_ok & (j[None, :] <= j[:, None])[None]  # key j <= query t
    mask = torch.cat([prefix_ok[:, None, :].expand(-1, max_len, -1), new_ok.expand(-1, max_len, -1)], 2)[:, None]
    pad_gather = unpad_index = None
    if num_seqs > 1 and min(query_lens) != max_len:
        starts = lens.cumsum(0) - lens
        num_tokens = sum(query_lens)
        pad_gather = (starts[:, None] + j[None, :]).clamp(max=num_tokens - 1).reshape(-1)
        seq = torch.repeat_interleave(torch.arange(num_seqs, device=device), lens)
        unpad_index = seq * max_len + torch.arange(num_tokens, device=device) - starts[seq]
    return PaddedLayout(num_seqs, max_len, max_context, prefix_slots, pad_gather, unpad_index, mask)


def paged_attention_padded(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor,
                           v_pool: torch.Tensor, layout: PaddedLayout, scale: float) -> torch.Tensor:
    """``paged_attention_reference``'s result (up to float rounding) in a handful of batched torch ops, for the
    CPU executor: each sequence's prefix is gathered once ([N, C, Hkv, D]), the new tokens padded per sequence,
    one masked SDPA over the batch (fp32), and the rows put back in ragged order. Same shapes as the reference;
    the pattern and the sizes come from ``layout`` (``padded_layout``). The ONNX reference form
    (build/onnx_graph.py) computes attention the same way."""
    n, t, c = layout.num_seqs, layout.max_len, layout.max_context
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_new.shape[1]

    def padded(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [N, Tmax, H, D]
        x = x if layout.pad_gather is None else x.index_select(0, layout.pad_gather)
        return x.reshape(n, t, x.shape[1], head_dim)

    def keys(pool: torch.Tensor, new: torch.Tensor) -> torch.Tensor:  # [N, Hkv, C + Tmax, D] fp32
        prefix = pool.reshape(-1, num_kv_heads, head_dim).index_select(0, layout.prefix_slots)
        both = torch.cat([prefix.reshape(n, c, num_kv_heads, head_dim).float(), padded(new).float()], 1)
        return both.transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q).float().transpose(1, 2), keys(k_pool, k_new),
                                         keys(v_pool, v_new), attn_mask=layout.mask, scale=scale, enable_gqa=True)
    out = out.transpose(1, 2).reshape(n * t, num_q_heads, head_dim)
    out = out if layout.unpad_index is None else out.index_select(0, layout.unpad_index)
    return out.to(q.dtype)


# ---- Triton kernels ----------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:  # fp32 or mixed-dtype inputs, or bf16 under the interpreter
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a.to(b.dtype), b)
    return out


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, DOT_FP32: tl.constexpr):
    # online softmax over one key tile: s [BLOCK_M, BLOCK_N] scores in log2 units (-inf = masked)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at zero weight
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p, v, DOT_FP32)
    return acc, m_new, l_i


@triton.jit
def _attend(q_ptr, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start, num_seqs, stride_bt,
            stride_qt, stride_qh, stride_nt, stride_nh, stride_pp, stride_pr, stride_ph, split, num_splits,
            SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr, PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """Unnormalised output, running max and sum of this program's rows over its share of the keys."""
    block_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    # the sequence owning this query block: largest s with query_start[s] // BLOCK_Q + s <= block_idx
    lo = tl.load(query_start) * 0  # a tensor (not a constexpr, even when num_seqs is specialised to 1)
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start + mid) // BLOCK_Q + mid <= block_idx:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(query_start + seq)
    num_new = tl.load(query_start + seq + 1) - q_start
    q_block = block_idx - (q_start // BLOCK_Q + seq)
    is_active = q_block * BLOCK_Q < num_new  # a sequence's last block index may hold no query

    offs_m = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + offs_m // GROUP  # query token within the sequence
    head = kv_head * GROUP + offs_m % GROUP  # query head
    row_ok = (offs_m < BLOCK_Q * GROUP) & (tok < num_new)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_off = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qk_scale = SCALE * 1.4426950408889634  # exp2 domain

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # committed prefix: visible to every query in both patterns; this split's share is [lo_n, hi_n)
    num_prefix = tl.load(context_lens + seq)
    chunk = tl.cdiv(tl.cdiv(num_prefix, num_splits), BLOCK_N) * BLOCK_N
    lo_n = split * chunk
    hi_n = tl.where(is_active, tl.minimum(num_prefix, lo_n + chunk), lo_n)
    for n0 in range(lo_n, hi_n, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi_n
        page = tl.load(block_tables + seq * stride_bt + n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        kv_off = page * stride_pp + (n % PAGE_SIZE) * stride_pr + kv_head * stride_ph
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_pool + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_FP32) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        v = tl.load(v_pool + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, DOT_FP32)

    # the sequence's own new keys (last split): all of them, or (causal) those at or before each query
    if split == num_splits - 1:
        hi_j = tl.where(is_active, num_new, 0)
        if IS_CAUSAL:
            hi_j = tl.minimum(hi_j, (q_block + 1) * BLOCK_Q)
        for j0 in range(0, hi_j, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            j_ok = j < hi_j
            kv_off = (q_start + j).to(tl.int64) * stride_nt + kv_head * stride_nh
            kv_mask = j_ok[:, None] & d_ok[None, :]
            k = tl.load(k_new + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), DOT_FP32) * qk_scale
            visible = j_ok[None, :]
            if IS_CAUSAL:
                visible = visible & (j[None, :] <= tok[:, None])
            s = tl.where(visible, s, float("-inf"))
            v = tl.load(v_new + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, DOT_FP32)
    return acc, m_i, l_i, q_start + tok, head, row_ok


@triton.jit(do_not_specialize=["num_seqs"])
def _paged_attention_kernel(
        q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start,  # inputs
        num_seqs, stride_bt, stride_qt, stride_qh, stride_nt, stride_nh, stride_pp, stride_pr, stride_ph,
        stride_ot, stride_oh,  # integer extras
        out,  # output
        SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr, PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    acc, m_i, l_i, row, head, row_ok = _attend(
        q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start, num_seqs, stride_bt,
        stride_qt, stride_qh, stride_nt, stride_nh, stride_pp, stride_pr, stride_ph, 0, 1, SCALE, IS_CAUSAL,
        PAGE_SIZE, GROUP, HEAD_DIM, BLOCK_M, BLOCK_Q, BLOCK_N, BLOCK_D, DOT_FP32)
    d = tl.arange(0, BLOCK_D)
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_off = row.to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out + o_off[:, None] + d[None, :], o.to(out.dtype.element_ty),
             mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["num_seqs", "num_tokens", "num_splits"])
def _paged_attention_split_kernel(
        q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start,
        num_seqs, num_tokens, num_splits, stride_bt, stride_qt, stride_qh, stride_nt, stride_nh, stride_pp,
        stride_pr, stride_ph, part_acc, part_m, part_l,
        SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr, PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, NUM_Q_HEADS: tl.constexpr, DOT_FP32: tl.constexpr):
    split = tl.program_id(2)
    acc, m_i, l_i, row, head, row_ok = _attend(
        q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start, num_seqs, stride_bt,
        stride_qt, stride_qh, stride_nt, stride_nh, stride_pp, stride_pr, stride_ph, split, num_splits, SCALE,
        IS_CAUSAL, PAGE_SIZE, GROUP, HEAD_DIM, BLOCK_M, BLOCK_Q, BLOCK_N, BLOCK_D, DOT_FP32)
    d = tl.arange(0, BLOCK_D)
    idx = (split * num_tokens + row).to(tl.int64) * NUM_Q_HEADS + head  # partials [splits, T, Hq]
    tl.store(part_m + idx, m_i, mask=row_ok)
    tl.store(part_l + idx, l_i, mask=row_ok)
    tl.store(part_acc + idx[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["num_tokens", "num_splits"])
def _combine_splits_kernel(part_acc, part_m, part_l, out, num_tokens, num_splits, stride_ot, stride_oh,
                           NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    idx = (s * num_tokens + row).to(tl.int64) * NUM_Q_HEADS + head
    m = tl.load(part_m + idx, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_l + idx, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)  # finite: the last split holds the query's own key
    w = tl.math.exp2(m - m_max)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    acc = tl.load(part_acc + idx[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(out + row.to(tl.int64) * stride_ot + head * stride_oh + d, o.to(out.dtype.element_ty), mask=d_ok)


# ---- launcher ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes; ``num_splits`` 0 = choose from the occupancy (1 = single pass)."""

    block_m: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int = 0


def choose_config(max_query_len: int, group: int, head_dim: int) -> AttentionConfig:
    """Tiles for a batch: BLOCK_M covers the group's rows of up to ``max_query_len`` tokens (16 .. 64/128)."""
    cap = 128 if head_dim <= 64 else 64
    block_m = min(max(16, next_pow2(max_query_len * group)), max(cap, next_pow2(group)))
    return AttentionConfig(block_m=block_m, block_n=64 if head_dim <= 128 else 32,
                           num_warps=4 if block_m <= 64 else 8)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(cfg: AttentionConfig, num_programs: int, device: torch.device, context_lens: torch.Tensor,
                max_context_len: Optional[int]) -> int:
    if cfg.num_splits:
        return cfg.num_splits
    if device.type != "cuda":
        return 1
    num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if num_programs >= num_sms:
        return 1
    longest = int(context_lens.max()) if max_context_len is None else max_context_len
    return max(1, min(math.ceil(2 * num_sms / num_programs), math.ceil(longest / 256), 32))


def paged_attention_triton(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor,
                           v_pool: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                           query_start: torch.Tensor, is_causal: bool, scale: float,
                           page_size: Optional[int] = None, *, max_query_len: Optional[int] = None,
                           max_context_len: Optional[int] = None, config: Optional[AttentionConfig] = None,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launcher of the Triton kernels; same contract as ``paged_attention_reference``. ``max_query_len`` /
    ``max_context_len`` are host-side hints (no device sync when given); ``config`` overrides the tiles."""
    _check(q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start, page_size)
    check_launch(_paged_attention_kernel, q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, num_seqs = k_new.shape[1], context_lens.shape[0]
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    check("out", out, tuple(q.shape), (q.dtype,))
    if num_tokens == 0:
        return out
    if max_query_len is None:
        max_query_len = -(-num_tokens // num_seqs) if num_seqs else 1
    cfg = config or choose_config(max_query_len, group, head_dim)
    assert cfg.block_m >= group and cfg.block_m & (cfg.block_m - 1) == 0, (cfg, group)
    block_q = cfg.block_m // group
    grid_x = num_tokens // block_q + num_seqs
    num_splits = _num_splits(cfg, grid_x * num_kv_heads, q.device, context_lens, max_context_len)
    interpreted = is_interpreted(_paged_attention_kernel)  # bf16 tl.dot is wrong in the interpreter
    consts = dict(SCALE=float(scale), IS_CAUSAL=bool(is_causal), PAGE_SIZE=k_pool.shape[1], GROUP=group,
                  HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_Q=block_q, BLOCK_N=cfg.block_n,
                  BLOCK_D=max(16, next_pow2(head_dim)),
                  # tensor-core dots for fp16/bf16; fp32 (ieee) otherwise, and for bf16 in the interpreter
                  DOT_FP32=q.dtype == torch.float32 or k_pool.dtype != q.dtype or
                  (interpreted and q.dtype == torch.bfloat16))
    common = (q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start)
    strides = (block_tables.stride(0), q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1),
               k_pool.stride(0), k_pool.stride(1), k_pool.stride(2))
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if num_splits == 1:
        _paged_attention_kernel[(grid_x, num_kv_heads)](
            *common, num_seqs, *strides, out.stride(0), out.stride(1), out, **consts, **launch)
        return out
    part_acc = torch.empty(num_splits, num_tokens, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    part_m = torch.empty(num_splits, num_tokens, num_q_heads, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    _paged_attention_split_kernel[(grid_x, num_kv_heads, num_splits)](
        *common, num_seqs, num_tokens, num_splits, *strides, part_acc, part_m, part_l, **consts,
        NUM_Q_HEADS=num_q_heads, **launch)
    _combine_splits_kernel[(num_tokens, num_q_heads)](
        part_acc, part_m, part_l, out, num_tokens, num_splits, out.stride(0), out.stride(1),
        NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, BLOCK_S=next_pow2(num_splits),
        BLOCK_D=next_pow2(head_dim), num_warps=1 if head_dim <= 64 else 2)
    return out


def _check(q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start, page_size) -> None:
    check("q", q, (None, None, None), FLOAT_DTYPES)
    num_tokens, num_q_heads, head_dim = q.shape
    check("k_new", k_new, (num_tokens, None, head_dim), (q.dtype,))
    check("v_new", v_new, tuple(k_new.shape), (q.dtype,))
    num_kv_heads = k_new.shape[1]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise KernelArgumentError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if v_new.stride() != k_new.stride():
        raise KernelArgumentError(f"k_new and v_new must share strides, got {k_new.stride()} and {v_new.stride()}")
    check("k_pool", k_pool, (None, page_size, num_kv_heads, head_dim), FLOAT_DTYPES)
    check("v_pool", v_pool, tuple(k_pool.shape), (k_pool.dtype,))
    if v_pool.stride() != k_pool.stride():
        raise KernelArgumentError(f"k_pool and v_pool must share strides, got {k_pool.stride()} and {v_pool.stride()}")
    check("context_lens", context_lens, (None,), (torch.int32,))
    num_seqs = context_lens.shape[0]
    check("query_start", query_start, (num_seqs + 1,), (torch.int32,))
    check("block_tables", block_tables, (num_seqs, None), (torch.int32,))


# ---- TensorRT plugin ---------------------------------------------------------------------------------------

# TensorRT tactic -> tiles (block_m, block_n, num_warps, num_stages); the single-pass kernel only
TACTICS = {1: (16, 64, 4, 2), 2: (16, 32, 4, 3), 3: (64, 64, 4, 2), 4: (128, 32, 8, 2)}


def aot_signature(dtype: torch.dtype, pool_dtype: torch.dtype) -> dict:
    """Triton signature of the single-pass kernel in TensorRT's AOT order (inputs, integer extras, outputs)."""
    f, p = TRITON_DTYPE[dtype], TRITON_DTYPE[pool_dtype]
    sig = {"q": f"*{f}", "k_new": f"*{f}", "v_new": f"*{f}", "k_pool": f"*{p}", "v_pool": f"*{p}",
           "block_tables": "*i32", "context_lens": "*i32", "query_start": "*i32"}
    sig.update({name: "i32" for name in ("num_seqs", "stride_bt", "stride_qt", "stride_qh", "stride_nt",
                                         "stride_nh", "stride_pp", "stride_pr", "stride_ph", "stride_ot",
                                         "stride_oh")})
    sig["out"] = f"*{f}"
    sig.update({name: "constexpr" for name in ("SCALE", "IS_CAUSAL", "PAGE_SIZE", "GROUP", "HEAD_DIM", "BLOCK_M",
                                               "BLOCK_Q", "BLOCK_N", "BLOCK_D", "DOT_FP32")})
    return sig


def aot_compile(dtype: torch.dtype, pool_dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int,
                page_size: int, is_causal: bool, scale: float, tactic: int = 1, arch: Optional[int] = None
                ) -> Tuple[str, str, int, int, int]:
    """(kernel name, PTX, threads per block, shared bytes, BLOCK_Q) of the single-pass kernel."""
    block_m, block_n, num_warps, num_stages = TACTICS.get(tactic, TACTICS[1])
    group = num_q_heads // num_kv_heads
    block_m = max(block_m, next_pow2(group))
    consts = dict(SCALE=float(scale), IS_CAUSAL=bool(is_causal), PAGE_SIZE=page_size, GROUP=group,
                  HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_Q=block_m // group, BLOCK_N=block_n,
                  BLOCK_D=max(16, next_pow2(head_dim)), DOT_FP32=dtype == torch.float32 or pool_dtype != dtype)
    name, ptx, threads, shared = compile_ptx(_paged_attention_kernel, aot_signature(dtype, pool_dtype), consts,
                                             num_warps, num_stages, arch)
    return name, ptx, threads, shared, block_m // group


def launch_grid(num_tokens, num_seqs, num_kv_heads, block_q: int):
    """Grid of the single-pass kernel from ints or TensorRT symbolic expressions (uses only // and +)."""
    return num_tokens // block_q + num_seqs, num_kv_heads, 1


def aot_extra_args(num_seqs, max_pages, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int):
    """The kernel's integer extras for contiguous tensors, in signature order."""
    return (num_seqs, max_pages, num_q_heads * head_dim, head_dim, num_kv_heads * head_dim, head_dim,
            page_size * num_kv_heads * head_dim, num_kv_heads * head_dim, head_dim, num_q_heads * head_dim, head_dim)


def register_tensorrt_plugin() -> None:
    """Register ``trimode::paged_attention`` with TensorRT's ``tensorrt.plugin`` (QDP) registry: shape/dtype rule
    (out like q), autotune (fp32/fp16/bf16 x tile tactics) and an AOT implementation (the single-pass Triton
    kernel compiled to PTX; is_causal, scale and page_size are baked in, since AOT attributes are not serialized).

    Written against the TensorRT 11 ``tensorrt.plugin`` API; it could not be run here (TensorRT cannot be
    installed on the project's machines). ``aot_compile``, ``launch_grid`` and ``aot_extra_args`` are tested.
    """
    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def _desc(q: trtp.TensorDesc, k_new: trtp.TensorDesc, v_new: trtp.TensorDesc, k_pool: trtp.TensorDesc,
              v_pool: trtp.TensorDesc, block_tables: trtp.TensorDesc, context_lens: trtp.TensorDesc,
              query_start: trtp.TensorDesc, is_causal: int, scale: float, page_size: int) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(PLUGIN_ID)
    def _autotune(q: trtp.TensorDesc, k_new: trtp.TensorDesc, v_new: trtp.TensorDesc, k_pool: trtp.TensorDesc,
                  v_pool: trtp.TensorDesc, block_tables: trtp.TensorDesc, context_lens: trtp.TensorDesc,
                  query_start: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(autotune_io("paged_attention"), "LINEAR", list(TACTICS))]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(q: trtp.TensorDesc, k_new: trtp.TensorDesc, v_new: trtp.TensorDesc, k_pool: trtp.TensorDesc,
             v_pool: trtp.TensorDesc, block_tables: trtp.TensorDesc, context_lens: trtp.TensorDesc,
             query_start: trtp.TensorDesc, is_causal: int, scale: float, page_size: int,
             outputs: Tuple[trtp.TensorDesc], tactic: int
             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        num_q_heads, head_dim = q.shape_expr[1].constant_value(), q.shape_expr[2].constant_value()
        num_kv_heads = k_new.shape_expr[1].constant_value()
        name, ptx, threads, shared, block_q = aot_compile(
            torch_dtype_of(trt, q.dtype), torch_dtype_of(trt, k_pool.dtype), num_q_heads, num_kv_heads, head_dim,
            page_size, bool(is_causal), scale, tactic)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = launch_grid(q.shape_expr[0], context_lens.shape_expr[0],
                                                                  num_kv_heads, block_q)
        launch.block_x, launch.shared_mem = threads, shared
        extra = aot_extra_args(context_lens.shape_expr[0], block_tables.shape_expr[1], num_q_heads, num_kv_heads,
                               head_dim, page_size)
        return name.encode(), ptx.encode(), launch, trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extra])


__all__ = ["paged_attention_reference", "paged_attention_triton", "attend_dense", "AttentionConfig", "PaddedLayout",
           "padded_layout", "paged_attention_padded",
           "choose_config", "register_tensorrt_plugin", "aot_compile"]

"""``draft_verify``: per sequence, from its draft tokens and the target's outputs over the block, the number of
tokens to emit (``accepted`` = accepted drafts + 1) and the last emitted token (``bonus``). Emitted tokens are
``draft[:accepted - 1] + [bonus]``. Op contract: docs/kernels.md.

- Greedy (T = 0): ``accepted = 1 + leading run of i with argmax(target_logits[i]) == draft[i]`` (mask id excluded
  from the argmax), ``bonus = argmax(target_logits[accepted - 1])``. The argmax is fused over the vocabulary:
  only the two int32 results leave the device. Agrees with ``runtime.acceptance.greedy_accept``.
- Sampling (T > 0), speculative rejection sampling: draft i (of n = draft_lens) is accepted iff
  ``u_i * q_i(d_i) <= p_i(d_i)`` (probability min(1, p/q)); at the first rejection k the bonus is drawn by
  inverse CDF from norm(max(0, p_k - q_k)) (p_k if that is all zero) with ``u' = (u_k - r) / (1 - r)``,
  r = p_k(d_k) / q_k(d_k) (given the rejection, u' is uniform on [0, 1)); if all n drafts are accepted the bonus
  is drawn from p_n with u_n. So one uniform per block position suffices and the emitted tokens are distributed
  exactly as sampling from p token by token (same law as ``runtime.acceptance.rejection_accept``).
"""

from typing import List, Optional, Tuple, Union

import torch

from trimode.plugins._common import FLOAT_DTYPES, TRITON_DTYPE, check, check_launch, compile_ptx, \
    next_pow2, tl, torch_dtype_of, triton
from trimode.plugins.signatures import autotune_io

PLUGIN_ID = "trimode::draft_verify"
SAMPLING_PLUGIN_ID = "trimode::draft_verify_sampling"


# ---- references --------------------------------------------------------------------------------------------

def draft_verify_greedy_reference(draft_tokens: torch.Tensor, target_logits: torch.Tensor, draft_lens: torch.Tensor,
                                  mask_token_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """draft_tokens [S, B-1] int32, target_logits [S, B, V], draft_lens [S] int32 -> accepted, bonus [S] int32."""
    _check_greedy(draft_tokens, target_logits, draft_lens)
    target = argmax_without(target_logits, mask_token_id)  # [S, B]
    num_drafts = draft_tokens.shape[1]
    if num_drafts == 0:  # no drafts (a prefill / decode / commit row): the argmax of the one row
        return torch.ones_like(draft_lens), target[:, 0].int()
    in_draft = torch.arange(num_drafts, device=draft_lens.device)[None, :] < draft_lens[:, None]
    matches = (target[:, :num_drafts] == draft_tokens.long()) & in_draft
    accepted = matches.int().cumprod(1).sum(1) + 1
    bonus = target.gather(1, (accepted - 1).long()[:, None]).squeeze(1)
    return accepted.int(), bonus.int()


def argmax_without(logits: torch.Tensor, excluded: int) -> torch.Tensor:
    """Index of the first maximum over the last axis of ``logits`` with token ``excluded`` (the mask id) left out,
    int64. ``max`` finds the first maximum without a copy; rows where ``excluded`` won are done again on a copy
    with it at -inf (the rule of ``runtime.sampling.select_tokens``)."""
    index = logits.max(-1).indices
    won = index == excluded
    if bool(won.any()):
        rows = logits[won].float().clone()
        rows[..., excluded] = float("-inf")
        index[won] = rows.argmax(-1)
    return index


def draft_verify_sampling_reference(draft_tokens: torch.Tensor, draft_lens: torch.Tensor, draft_probs: torch.Tensor,
                                    target_probs: torch.Tensor, uniforms: torch.Tensor
                                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """draft_probs q [S, B-1, V], target_probs p [S, B, V], uniforms [S, B] -> accepted, bonus [S] int32."""
    _check_sampling(draft_tokens, draft_lens, draft_probs, target_probs, uniforms)
    accepted, bonus = [], []
    for s in range(draft_tokens.shape[0]):
        p, q, u = target_probs[s].float(), draft_probs[s].float(), uniforms[s].float()
        n, k = int(draft_lens[s]), 0
        while k < n and u[k] * q[k, draft_tokens[s, k]] <= p[k, draft_tokens[s, k]]:
            k += 1
        weights, u_draw = p[k], u[k]
        if k < n:
            r = p[k, draft_tokens[s, k]] / q[k, draft_tokens[s, k]]
            u_draw = (u[k] - r) / (1 - r)
            residual = (p[k] - q[k]).clamp_min(0)
            if residual.sum() > 0:
                weights = residual
        accepted.append(k + 1)
        bonus.append(inverse_cdf(weights, u_draw))
    device = draft_tokens.device
    return torch.tensor(accepted, dtype=torch.int32, device=device), torch.tensor(bonus, dtype=torch.int32,
                                                                                   device=device)


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> int:
    """The first index whose cumulative weight exceeds u * total (the last positive one if rounding says none)."""
    cum = weights.cumsum(0)
    hit = ((cum > u * cum[-1]) & (weights > 0)).nonzero()
    return int(hit[0]) if hit.numel() else int((weights > 0).nonzero()[-1])


# ---- Triton kernels ----------------------------------------------------------------------------------------

@triton.jit
def _argmax_row(row_ptr, vocab, MASK_TOKEN_ID: tl.constexpr, BLOCK_V: tl.constexpr):
    # leftmost argmax of one row of logits, the mask token excluded; per-lane running best, then one reduce
    best = tl.zeros([BLOCK_V], dtype=tl.float32) - float("inf")
    best_idx = tl.zeros([BLOCK_V], dtype=tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + v, mask=v < vocab, other=float("-inf")).to(tl.float32)
        x = tl.where(v == MASK_TOKEN_ID, float("-inf"), x)
        take = x > best  # strict: the earlier index keeps ties
        best_idx = tl.where(take, v, best_idx)
        best = tl.where(take, x, best)
    top = tl.max(best, 0)
    return tl.min(tl.where(best == top, best_idx, vocab), 0)


@triton.jit
def _draft_verify_greedy_kernel(draft_tokens, target_logits, draft_lens,  # inputs
                                vocab, stride_ds, stride_ls, stride_lb,  # integer extras
                                accepted, bonus,  # outputs
                                MASK_TOKEN_ID: tl.constexpr, BLOCK_V: tl.constexpr):
    # one program per sequence; rows are scanned in order and the scan stops at the first mismatch
    s = tl.program_id(0)
    n = tl.load(draft_lens + s)
    i = n * 0
    target = n * 0
    go = n >= 0
    while go:
        row = target_logits + s.to(tl.int64) * stride_ls + i.to(tl.int64) * stride_lb
        target = _argmax_row(row, vocab, MASK_TOKEN_ID, BLOCK_V)
        draft = tl.load(draft_tokens + s * stride_ds + i, mask=i < n, other=-1)
        go = (i < n) & (target == draft)
        i += 1
    tl.store(accepted + s, i)
    tl.store(bonus + s, target)


@triton.jit
def _draft_verify_sampling_kernel(draft_tokens, draft_lens, draft_probs, target_probs, uniforms,  # inputs
                                  vocab, stride_ds, stride_qs, stride_qb, stride_ps, stride_pb, stride_us,  # extras
                                  accepted, bonus,  # outputs
                                  BLOCK_V: tl.constexpr):
    s = tl.program_id(0)
    n = tl.load(draft_lens + s)
    p_seq = target_probs + s.to(tl.int64) * stride_ps
    q_seq = draft_probs + s.to(tl.int64) * stride_qs
    # accept drafts while u_k * q_k(d_k) <= p_k(d_k)
    k = n * 0
    go = k < n
    while go:
        d = tl.load(draft_tokens + s * stride_ds + k)
        p_d = tl.load(p_seq + k * stride_pb + d).to(tl.float32)
        q_d = tl.load(q_seq + k * stride_qb + d).to(tl.float32)
        u = tl.load(uniforms + s * stride_us + k)
        ok = u * q_d <= p_d
        k += ok.to(tl.int32)
        go = ok & (k < n)
    rejected = k < n
    d = tl.load(draft_tokens + s * stride_ds + k, mask=rejected, other=0)
    p_d = tl.load(p_seq + k * stride_pb + d, mask=rejected, other=0.0).to(tl.float32)
    q_d = tl.load(q_seq + k * stride_qb + d, mask=rejected, other=1.0).to(tl.float32)
    u = tl.load(uniforms + s * stride_us + k)
    r = p_d / q_d
    u_draw = tl.where(rejected, (u - r) / (1.0 - r), u)
    # pass 1: totals of p_k and of the residual max(0, p_k - q_k)
    q_vocab = tl.where(rejected, vocab, 0)  # q_k is only read after a rejection (row n may not exist)
    total_p = tl.zeros([BLOCK_V], dtype=tl.float32)
    total_res = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        p = tl.load(p_seq + k * stride_pb + v, mask=v < vocab, other=0.0).to(tl.float32)
        q = tl.load(q_seq + k * stride_qb + v, mask=v < q_vocab, other=0.0).to(tl.float32)
        total_p += p
        total_res += tl.maximum(p - q, 0.0)
    use_res = rejected & (tl.sum(total_res, 0) > 0)
    target = u_draw * tl.where(use_res, tl.sum(total_res, 0), tl.sum(total_p, 0))
    q_vocab = tl.where(use_res, vocab, 0)
    # pass 2: first index whose running weight exceeds target (fallback: the last positive weight)
    running = tl.sum(total_p, 0) * 0.0
    chosen = n * 0 - 1
    last_pos = n * 0
    for v0 in range(0, vocab, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        p = tl.load(p_seq + k * stride_pb + v, mask=v < vocab, other=0.0).to(tl.float32)
        q = tl.load(q_seq + k * stride_qb + v, mask=v < q_vocab, other=0.0).to(tl.float32)
        w = tl.where(use_res, tl.maximum(p - q, 0.0), p)
        cum = tl.cumsum(w, 0) + running
        first = tl.min(tl.where((cum > target) & (w > 0), v, vocab), 0)
        chosen = tl.where((chosen < 0) & (first < vocab), first, chosen)
        last_pos = tl.maximum(last_pos, tl.max(tl.where(w > 0, v, 0), 0))
        running += tl.sum(w, 0)
    tl.store(accepted + s, k + 1)
    tl.store(bonus + s, tl.where(chosen < 0, last_pos, chosen))


# ---- launchers ---------------------------------------------------------------------------------------------

def _block_v(vocab: int) -> int:
    return min(4096, max(16, next_pow2(vocab)))


def draft_verify_greedy_triton(draft_tokens: torch.Tensor, target_logits: torch.Tensor, draft_lens: torch.Tensor,
                               mask_token_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launcher of the greedy kernel; same contract as ``draft_verify_greedy_reference``."""
    _check_greedy(draft_tokens, target_logits, draft_lens)
    check_launch(_draft_verify_greedy_kernel, draft_tokens, target_logits, draft_lens)
    num_seqs, _, vocab = target_logits.shape
    accepted = torch.empty(num_seqs, dtype=torch.int32, device=draft_lens.device)
    bonus = torch.empty_like(accepted)
    if num_seqs:
        _draft_verify_greedy_kernel[(num_seqs,)](
            draft_tokens, target_logits, draft_lens, vocab, draft_tokens.stride(0), target_logits.stride(0),
            target_logits.stride(1), accepted, bonus, MASK_TOKEN_ID=mask_token_id, BLOCK_V=_block_v(vocab),
            num_warps=4)
    return accepted, bonus


def draft_verify_sampling_triton(draft_tokens: torch.Tensor, draft_lens: torch.Tensor, draft_probs: torch.Tensor,
                                 target_probs: torch.Tensor, uniforms: torch.Tensor
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launcher of the rejection-sampling kernel; same contract as ``draft_verify_sampling_reference``."""
    _check_sampling(draft_tokens, draft_lens, draft_probs, target_probs, uniforms)
    check_launch(_draft_verify_sampling_kernel, draft_tokens, draft_lens, draft_probs, target_probs, uniforms)
    num_seqs, _, vocab = target_probs.shape
    accepted = torch.empty(num_seqs, dtype=torch.int32, device=draft_lens.device)
    bonus = torch.empty_like(accepted)
    if num_seqs:
        _draft_verify_sampling_kernel[(num_seqs,)](
            draft_tokens, draft_lens, draft_probs, target_probs, uniforms, vocab, draft_tokens.stride(0),
            draft_probs.stride(0), draft_probs.stride(1), target_probs.stride(0), target_probs.stride(1),
            uniforms.stride(0), accepted, bonus, BLOCK_V=_block_v(vocab), num_warps=4)
    return accepted, bonus


def _check_greedy(draft_tokens, target_logits, draft_lens) -> None:
    check("target_logits", target_logits, (None, None, None), FLOAT_DTYPES)
    num_seqs, block, _ = target_logits.shape
    check("draft_tokens", draft_tokens, (num_seqs, block - 1), (torch.int32,))
    check("draft_lens", draft_lens, (num_seqs,), (torch.int32,))


def _check_sampling(draft_tokens, draft_lens, draft_probs, target_probs, uniforms) -> None:
    check("target_probs", target_probs, (None, None, None), FLOAT_DTYPES)
    num_seqs, block, vocab = target_probs.shape
    check("draft_tokens", draft_tokens, (num_seqs, block - 1), (torch.int32,))
    check("draft_lens", draft_lens, (num_seqs,), (torch.int32,))
    check("draft_probs", draft_probs, (num_seqs, block - 1, vocab), FLOAT_DTYPES)
    check("uniforms", uniforms, (num_seqs, block), (torch.float32,))


# ---- TensorRT plugins --------------------------------------------------------------------------------------

TACTICS = {1: (4096, 4), 2: (2048, 4), 3: (8192, 8)}  # tactic -> (BLOCK_V, num_warps)


def aot_signature_greedy(logits_dtype: torch.dtype) -> dict:
    sig = {"draft_tokens": "*i32", "target_logits": f"*{TRITON_DTYPE[logits_dtype]}", "draft_lens": "*i32"}
    sig.update({name: "i32" for name in ("vocab", "stride_ds", "stride_ls", "stride_lb")})
    sig.update({"accepted": "*i32", "bonus": "*i32", "MASK_TOKEN_ID": "constexpr", "BLOCK_V": "constexpr"})
    return sig


def aot_signature_sampling(probs_dtype: torch.dtype) -> dict:
    f = TRITON_DTYPE[probs_dtype]
    sig = {"draft_tokens": "*i32", "draft_lens": "*i32", "draft_probs": f"*{f}", "target_probs": f"*{f}",
           "uniforms": "*fp32"}
    sig.update({name: "i32" for name in ("vocab", "stride_ds", "stride_qs", "stride_qb", "stride_ps", "stride_pb",
                                         "stride_us")})
    sig.update({"accepted": "*i32", "bonus": "*i32", "BLOCK_V": "constexpr"})
    return sig


def aot_compile_greedy(logits_dtype: torch.dtype, mask_token_id: int, tactic: int = 1,
                       arch: Optional[int] = None) -> Tuple[str, str, int, int]:
    block_v, num_warps = TACTICS.get(tactic, TACTICS[1])
    return compile_ptx(_draft_verify_greedy_kernel, aot_signature_greedy(logits_dtype),
                       dict(MASK_TOKEN_ID=mask_token_id, BLOCK_V=block_v), num_warps, 2, arch)


def aot_compile_sampling(probs_dtype: torch.dtype, tactic: int = 1,
                         arch: Optional[int] = None) -> Tuple[str, str, int, int]:
    block_v, num_warps = TACTICS.get(tactic, TACTICS[1])
    return compile_ptx(_draft_verify_sampling_kernel, aot_signature_sampling(probs_dtype), dict(BLOCK_V=block_v),
                       num_warps, 2, arch)


def register_tensorrt_plugin() -> None:
    """Register ``trimode::draft_verify`` (greedy; attribute mask_token_id) and ``trimode::draft_verify_sampling``
    with TensorRT's ``tensorrt.plugin`` (QDP) registry: outputs accepted/bonus int32 [num_seqs], autotune
    (logit/prob dtypes x BLOCK_V tactics), AOT implementations (one program per sequence).

    Written against the TensorRT 11 ``tensorrt.plugin`` API; it could not be run here (TensorRT cannot be
    installed on the project's machines). ``aot_compile_greedy`` / ``aot_compile_sampling`` are tested.
    """
    import tensorrt as trt
    import tensorrt.plugin as trtp

    def _outputs(draft_lens):
        shape = (draft_lens.shape_expr[0],)
        return trtp.from_shape_expr(shape, dtype=trt.int32), trtp.from_shape_expr(shape, dtype=trt.int32)

    @trtp.register(PLUGIN_ID)
    def _desc(draft_tokens: trtp.TensorDesc, target_logits: trtp.TensorDesc, draft_lens: trtp.TensorDesc,
              mask_token_id: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _outputs(draft_lens)

    @trtp.autotune(PLUGIN_ID)
    def _autotune(draft_tokens: trtp.TensorDesc, target_logits: trtp.TensorDesc, draft_lens: trtp.TensorDesc,
                  outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(autotune_io("draft_verify"), "LINEAR", list(TACTICS))]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(draft_tokens: trtp.TensorDesc, target_logits: trtp.TensorDesc, draft_lens: trtp.TensorDesc,
             mask_token_id: int, outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc], tactic: int
             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        name, ptx, threads, shared = aot_compile_greedy(torch_dtype_of(trt, target_logits.dtype), mask_token_id,
                                                        tactic)
        block, vocab = target_logits.shape_expr[1], target_logits.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.block_x, launch.shared_mem = draft_lens.shape_expr[0], threads, shared
        extra = [vocab, block - 1, block * vocab, vocab]
        return name.encode(), ptx.encode(), launch, trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extra])

    @trtp.register(SAMPLING_PLUGIN_ID)
    def _desc_sampling(draft_tokens: trtp.TensorDesc, draft_lens: trtp.TensorDesc, draft_probs: trtp.TensorDesc,
                       target_probs: trtp.TensorDesc, uniforms: trtp.TensorDesc
                       ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _outputs(draft_lens)

    @trtp.autotune(SAMPLING_PLUGIN_ID)
    def _autotune_sampling(draft_tokens: trtp.TensorDesc, draft_lens: trtp.TensorDesc,
                           draft_probs: trtp.TensorDesc, target_probs: trtp.TensorDesc, uniforms: trtp.TensorDesc,
                           outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(autotune_io("draft_verify_sampling"), "LINEAR", list(TACTICS))]

    @trtp.aot_impl(SAMPLING_PLUGIN_ID)
    def _aot_sampling(draft_tokens: trtp.TensorDesc, draft_lens: trtp.TensorDesc, draft_probs: trtp.TensorDesc,
                      target_probs: trtp.TensorDesc, uniforms: trtp.TensorDesc,
                      outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc], tactic: int
                      ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        name, ptx, threads, shared = aot_compile_sampling(torch_dtype_of(trt, target_probs.dtype), tactic)
        block, vocab = target_probs.shape_expr[1], target_probs.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.block_x, launch.shared_mem = draft_lens.shape_expr[0], threads, shared
        extra = [vocab, block - 1, (block - 1) * vocab, vocab, block * vocab, vocab, block]
        return name.encode(), ptx.encode(), launch, trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extra])


__all__ = ["draft_verify_greedy_reference", "draft_verify_sampling_reference", "draft_verify_greedy_triton",
           "draft_verify_sampling_triton", "register_tensorrt_plugin"]

"""``confidence_unmask``: for each masked position of a diffusion canvas, the argmax token (mask id excluded) and
its confidence, the softmax probability of the raw logits at that token, in one pass over the vocabulary
(online max / sum-of-exp). Rows with ``is_masked = 0`` are not read: token -1, confidence 0. Op contract:
docs/kernels.md. Agrees with ``runtime.sampling.select_tokens`` (T = 0) and ``runtime.unmasking.token_confidence``.

Also here: the reveal decision over a batch of blocks, ``reveal`` ([num_seqs, B] confidences -> bool), with the
policies of ``runtime.unmasking.reveal``: threshold (every masked position with confidence >= tau, and always
the most confident one), topk (the k most confident), leftmost (the k leftmost); everything on the last step;
confidence ties go to the leftmost position. It is a device-side helper, not a TensorRT plugin.
"""

from typing import List, Optional, Tuple, Union

import torch

from trimode.plugins._common import FLOAT_DTYPES, TRITON_DTYPE, check, check_launch, compile_ptx, \
    next_pow2, tl, torch_dtype_of, triton
from trimode.plugins.draft_verify import argmax_without
from trimode.plugins.signatures import autotune_io

PLUGIN_ID = "trimode::confidence_unmask"
POLICIES = ("threshold", "topk", "leftmost")


# ---- references --------------------------------------------------------------------------------------------

def confidence_unmask_reference(logits: torch.Tensor, is_masked: torch.Tensor, mask_token_id: int
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V], is_masked [N] bool -> tokens [N] int32, confidence [N] fp32."""
    _check(logits, is_masked)
    x = logits.float()
    tokens = argmax_without(x, mask_token_id)
    confidence = x.softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    tokens = torch.where(is_masked, tokens, -1).int()
    return tokens, torch.where(is_masked, confidence, 0.0)


def reveal_reference(confidence: torch.Tensor, is_masked: torch.Tensor, policy: str, threshold: Optional[float],
                     num_to_reveal: torch.Tensor, is_last_step: torch.Tensor) -> torch.Tensor:
    """confidence, is_masked [S, B]; num_to_reveal (k_s, at least 1 is revealed), is_last_step [S] -> bool [S, B]."""
    _check_reveal(confidence, is_masked, policy, threshold, num_to_reveal, is_last_step)
    pos = torch.arange(confidence.shape[1], device=confidence.device)
    c_i, c_j = confidence[:, :, None], confidence[:, None, :]
    if policy == "leftmost":
        ahead = (pos[None, :] < pos[:, None]).expand(confidence.shape[0], -1, -1)
    else:  # most confident first, leftmost among equals
        ahead = (c_j > c_i) | ((c_j == c_i) & (pos[None, None, :] < pos[None, :, None]))
    rank = (ahead & is_masked[:, None, :]).sum(-1)  # masked positions ordered before this one
    if policy == "threshold":
        chosen = (confidence >= threshold) | (rank == 0)
    else:
        chosen = rank < num_to_reveal.clamp_min(1)[:, None]
    return is_masked & (chosen | is_last_step[:, None])


# ---- Triton kernels ----------------------------------------------------------------------------------------

@triton.jit
def _confidence_unmask_kernel(logits, is_masked,  # inputs
                              vocab, stride_n,  # integer extras
                              tokens, confidence,  # outputs
                              MASK_TOKEN_ID: tl.constexpr, BLOCK_V: tl.constexpr):
    # one program per row; per-lane running max / sum-of-exp (all tokens) and best logit (mask id excluded)
    row = tl.program_id(0)
    masked = tl.load(is_masked + row) != 0
    hi = tl.where(masked, vocab, 0)  # unmasked rows read nothing
    m = tl.zeros([BLOCK_V], dtype=tl.float32) - float("inf")
    total = tl.zeros([BLOCK_V], dtype=tl.float32)
    best = tl.zeros([BLOCK_V], dtype=tl.float32) - float("inf")
    best_idx = tl.zeros([BLOCK_V], dtype=tl.int32)
    base = logits + row.to(tl.int64) * stride_n
    for v0 in range(0, hi, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + v, mask=v < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.math.exp(m - m_safe) + tl.math.exp(x - m_safe)
        m = m_new
        x = tl.where(v == MASK_TOKEN_ID, float("-inf"), x)
        take = x > best  # strict: the earlier index keeps ties
        best_idx = tl.where(take, v, best_idx)
        best = tl.where(take, x, best)
    m_row = tl.max(m, 0)
    m_row = tl.where(m_row == float("-inf"), 0.0, m_row)  # unmasked rows: nothing was read
    denom = tl.sum(total * tl.math.exp(m - m_row), 0)
    top = tl.max(best, 0)
    token = tl.min(tl.where(best == top, best_idx, vocab), 0)
    conf = tl.math.exp(top - m_row) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(tokens + row, tl.where(masked, token, -1))
    tl.store(confidence + row, tl.where(masked, conf, 0.0))


@triton.jit
def _reveal_kernel(confidence, is_masked, num_to_reveal, is_last_step, block_len, stride_c, stride_m, threshold,
                   reveal, stride_r, POLICY: tl.constexpr, BLOCK_B: tl.constexpr):
    # one program per block: rank of each position among the masked ones, then the policy's cut
    s = tl.program_id(0)
    i = tl.arange(0, BLOCK_B)
    ok = i < block_len
    conf = tl.load(confidence + s * stride_c + i, mask=ok, other=0.0).to(tl.float32)
    masked = (tl.load(is_masked + s * stride_m + i, mask=ok, other=0) != 0) & ok
    earlier = i[None, :] < i[:, None]  # [i, j]: j is left of i
    if POLICY == 2:  # leftmost
        ahead = earlier
    else:
        ahead = (conf[None, :] > conf[:, None]) | ((conf[None, :] == conf[:, None]) & earlier)
    rank = tl.sum((ahead & masked[None, :]).to(tl.int32), 1)
    if POLICY == 0:  # threshold, with the most confident one forced
        chosen = (conf >= threshold) | (rank == 0)
    else:
        chosen = rank < tl.maximum(tl.load(num_to_reveal + s), 1)
    chosen = masked & (chosen | (tl.load(is_last_step + s) != 0))
    tl.store(reveal + s * stride_r + i, chosen.to(tl.int8), mask=ok)


# ---- launchers ---------------------------------------------------------------------------------------------

def _block_v(vocab: int) -> int:
    return min(2048, max(16, next_pow2(vocab)))


def confidence_unmask_triton(logits: torch.Tensor, is_masked: torch.Tensor, mask_token_id: int
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launcher of the Triton kernel; same contract as ``confidence_unmask_reference``."""
    _check(logits, is_masked)
    check_launch(_confidence_unmask_kernel, logits, is_masked)
    num_rows, vocab = logits.shape
    tokens = torch.empty(num_rows, dtype=torch.int32, device=logits.device)
    confidence = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows:
        _confidence_unmask_kernel[(num_rows,)](
            logits, is_masked.view(torch.uint8), vocab, logits.stride(0), tokens, confidence,
            MASK_TOKEN_ID=mask_token_id, BLOCK_V=_block_v(vocab), num_warps=4)
    return tokens, confidence


def reveal_triton(confidence: torch.Tensor, is_masked: torch.Tensor, policy: str, threshold: Optional[float],
                  num_to_reveal: torch.Tensor, is_last_step: torch.Tensor) -> torch.Tensor:
    """Launcher of the reveal kernel; same contract as ``reveal_reference``."""
    _check_reveal(confidence, is_masked, policy, threshold, num_to_reveal, is_last_step)
    check_launch(_reveal_kernel, confidence, is_masked, num_to_reveal, is_last_step)
    num_seqs, block = confidence.shape
    out = torch.empty(num_seqs, block, dtype=torch.bool, device=confidence.device)
    if num_seqs and block:
        _reveal_kernel[(num_seqs,)](
            confidence, is_masked.view(torch.uint8), num_to_reveal, is_last_step.view(torch.uint8), block,
            confidence.stride(0), is_masked.stride(0), float(threshold or 0.0), out.view(torch.int8), out.stride(0),
            POLICY=POLICIES.index(policy), BLOCK_B=max(16, next_pow2(block)), num_warps=1)
    return out


def _check(logits: torch.Tensor, is_masked: torch.Tensor) -> None:
    check("logits", logits, (None, None), FLOAT_DTYPES)
    check("is_masked", is_masked, (logits.shape[0],), (torch.bool,))


def _check_reveal(confidence, is_masked, policy, threshold, num_to_reveal, is_last_step) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown reveal policy {policy!r}; choose one of {POLICIES}")
    if policy == "threshold" and threshold is None:
        raise ValueError("the threshold policy needs a threshold")
    check("confidence", confidence, (None, None), FLOAT_DTYPES)
    num_seqs, block = confidence.shape
    check("is_masked", is_masked, (num_seqs, block), (torch.bool,))
    check("num_to_reveal", num_to_reveal, (num_seqs,), (torch.int32, torch.int64))
    check("is_last_step", is_last_step, (num_seqs,), (torch.bool,))


# ---- TensorRT plugin ---------------------------------------------------------------------------------------

TACTICS = {1: (2048, 4), 2: (4096, 8), 3: (1024, 4)}  # tactic -> (BLOCK_V, num_warps)


def aot_signature(logits_dtype: torch.dtype) -> dict:
    return {"logits": f"*{TRITON_DTYPE[logits_dtype]}", "is_masked": "*u8", "vocab": "i32", "stride_n": "i32",
            "tokens": "*i32", "confidence": "*fp32", "MASK_TOKEN_ID": "constexpr", "BLOCK_V": "constexpr"}


def aot_compile(logits_dtype: torch.dtype, mask_token_id: int, tactic: int = 1,
                arch: Optional[int] = None) -> Tuple[str, str, int, int]:
    block_v, num_warps = TACTICS.get(tactic, TACTICS[1])
    return compile_ptx(_confidence_unmask_kernel, aot_signature(logits_dtype),
                       dict(MASK_TOKEN_ID=mask_token_id, BLOCK_V=block_v), num_warps, 2, arch)


def register_tensorrt_plugin() -> None:
    """Register ``trimode::confidence_unmask`` with TensorRT's ``tensorrt.plugin`` (QDP) registry: outputs tokens
    int32 [N] and confidence fp32 [N], autotune (logit dtypes x BLOCK_V tactics), AOT implementation (one program
    per row; mask_token_id baked in).

    Written against the TensorRT 11 ``tensorrt.plugin`` API; it could not be run here (TensorRT cannot be
    installed on the project's machines). ``aot_compile`` is tested.
    """
    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def _desc(logits: trtp.TensorDesc, is_masked: trtp.TensorDesc, mask_token_id: int
              ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        shape = (logits.shape_expr[0],)
        return trtp.from_shape_expr(shape, dtype=trt.int32), trtp.from_shape_expr(shape, dtype=trt.float32)

    @trtp.autotune(PLUGIN_ID)
    def _autotune(logits: trtp.TensorDesc, is_masked: trtp.TensorDesc,
                  outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(autotune_io("confidence_unmask"), "LINEAR", list(TACTICS))]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(logits: trtp.TensorDesc, is_masked: trtp.TensorDesc, mask_token_id: int,
             outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc], tactic: int
             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        name, ptx, threads, shared = aot_compile(torch_dtype_of(trt, logits.dtype), mask_token_id, tactic)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.block_x, launch.shared_mem = logits.shape_expr[0], threads, shared
        vocab = logits.shape_expr[1]
        return name.encode(), ptx.encode(), launch, trtp.SymIntExprs.from_tuple([trtp.SymInt32(vocab),
                                                                                 trtp.SymInt32(vocab)])


__all__ = ["confidence_unmask_reference", "confidence_unmask_triton", "reveal_reference", "reveal_triton",
           "register_tensorrt_plugin", "POLICIES"]

"""``kv_append``: write the kept tokens' K/V into their pages of the paged KV cache (prefill, AR decode, verify,
commit). Op contract: docs/kernels.md.

``slot_mapping[t]`` is token t's flat slot (page * page_size + row) or -1 (not written). The pool is updated
in place; rows with slot -1 and every other slot stay bit-identical. Holds the Triton kernel, its launcher, the
torch reference (normative) and the TensorRT plugin definition.
"""

from typing import List, Optional, Tuple, Union

import torch

from trimode.plugins._common import FLOAT_DTYPES, TRITON_DTYPE, KernelArgumentError, check, check_launch, \
    compile_ptx, next_pow2, tl, torch_dtype_of, triton
from trimode.plugins.signatures import autotune_io

PLUGIN_ID = "trimode::kv_append"


# ---- reference ---------------------------------------------------------------------------------------------

def kv_append_reference(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """k/v_new [T, Hkv, D] -> rows ``slot_mapping`` (>= 0) of one layer's pools [P, page_size, Hkv, D]."""
    _check(k_new, v_new, k_pool, v_pool, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, slots, k_new[keep].to(k_pool.dtype))
    v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, slots, v_new[keep].to(v_pool.dtype))


# ---- Triton kernel -----------------------------------------------------------------------------------------

@triton.jit
def _kv_append_kernel(k_new, v_new, k_pool_in, v_pool_in, slot_mapping,  # inputs
                      stride_new_t, stride_new_h,  # integer extras
                      k_pool, v_pool,  # outputs (aliased to the pool inputs)
                      NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per token: copy its [Hkv, D] row of K and V into its slot (pools are contiguous)
    token = tl.program_id(0)
    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
        src = token.to(tl.int64) * stride_new_t + h * stride_new_h + d
        dst = slot * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + d
        k = tl.load(k_new + src, mask=mask)
        tl.store(k_pool + dst, k.to(k_pool.dtype.element_ty), mask=mask)
        v = tl.load(v_new + src, mask=mask)
        tl.store(v_pool + dst, v.to(v_pool.dtype.element_ty), mask=mask)


def _num_warps(num_kv_heads: int, head_dim: int) -> int:
    return 4 if num_kv_heads * head_dim >= 2048 else 2 if num_kv_heads * head_dim >= 512 else 1


def kv_append_triton(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """Launcher of the Triton kernel; same contract as ``kv_append_reference``."""
    _check(k_new, v_new, k_pool, v_pool, slot_mapping)
    check_launch(_kv_append_kernel, k_new, v_new, k_pool, v_pool, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k_new.shape
    if num_tokens == 0:
        return
    _kv_append_kernel[(num_tokens,)](
        k_new, v_new, k_pool, v_pool, slot_mapping, k_new.stride(0), k_new.stride(1), k_pool, v_pool,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=next_pow2(num_kv_heads),
        BLOCK_D=next_pow2(head_dim), num_warps=_num_warps(num_kv_heads, head_dim))


def _check(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = k_new.shape if k_new.dim() == 3 else (None, None, None)
    check("k_new", k_new, (None, None, None), FLOAT_DTYPES)
    check("v_new", v_new, tuple(k_new.shape), (k_new.dtype,))
    if v_new.stride() != k_new.stride():
        raise KernelArgumentError(f"k_new and v_new must share strides, got {k_new.stride()} and {v_new.stride()}")
    check("k_pool", k_pool, (None, None, num_kv_heads, head_dim), FLOAT_DTYPES)
    check("v_pool", v_pool, tuple(k_pool.shape), (k_pool.dtype,))
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise KernelArgumentError("k_pool and v_pool (one layer's slice) must be contiguous")
    check("slot_mapping", slot_mapping, (num_tokens,), (torch.int64,))


# ---- TensorRT plugin ---------------------------------------------------------------------------------------

# TensorRT tactic -> num_warps of the kernel
TACTICS = {1: 1, 2: 2, 3: 4}


def aot_signature(dtype: torch.dtype, pool_dtype: torch.dtype) -> dict:
    """Triton signature in TensorRT's AOT argument order (inputs, integer extras, outputs)."""
    f, p = TRITON_DTYPE[dtype], TRITON_DTYPE[pool_dtype]
    return {"k_new": f"*{f}", "v_new": f"*{f}", "k_pool_in": f"*{p}", "v_pool_in": f"*{p}",
            "slot_mapping": "*i64", "stride_new_t": "i32", "stride_new_h": "i32", "k_pool": f"*{p}",
            "v_pool": f"*{p}", "NUM_KV_HEADS": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_H": "constexpr",
            "BLOCK_D": "constexpr"}


def aot_compile(dtype: torch.dtype, pool_dtype: torch.dtype, num_kv_heads: int, head_dim: int, tactic: int = 0,
                arch: Optional[int] = None) -> Tuple[str, str, int, int]:
    """(kernel name, PTX, threads per block, shared bytes) of the kernel for fixed head shape and dtypes."""
    constexprs = dict(NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=next_pow2(num_kv_heads),
                      BLOCK_D=next_pow2(head_dim))
    num_warps = TACTICS.get(tactic, _num_warps(num_kv_heads, head_dim))
    return compile_ptx(_kv_append_kernel, aot_signature(dtype, pool_dtype), constexprs, num_warps, 1, arch)


def launch_grid(num_tokens):
    """Grid (x, y, z) from the token count (an int, or a TensorRT symbolic expression)."""
    return num_tokens, 1, 1


def register_tensorrt_plugin() -> None:
    """Register ``trimode::kv_append`` with TensorRT's ``tensorrt.plugin`` (QDP) registry: shape/dtype rule (the
    pools, aliased: updated in place), autotune (dtypes x num_warps tactics) and an AOT implementation (the
    Triton kernel compiled to PTX, grid = one program per token).

    Written against the TensorRT 11 ``tensorrt.plugin`` API; it could not be run here (TensorRT cannot be
    installed on the project's machines). ``aot_compile`` and ``launch_grid``, which it calls, are tested.
    """
    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def _desc(k_new: trtp.TensorDesc, v_new: trtp.TensorDesc, k_pool: trtp.TensorDesc, v_pool: trtp.TensorDesc,
              slot_mapping: trtp.TensorDesc) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return k_pool.aliased(), v_pool.aliased()

    @trtp.autotune(PLUGIN_ID)
    def _autotune(k_new: trtp.TensorDesc, v_new: trtp.TensorDesc, k_pool: trtp.TensorDesc,
                  v_pool: trtp.TensorDesc, slot_mapping: trtp.TensorDesc,
                  outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(autotune_io("kv_append"), "LINEAR", list(TACTICS))]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(k_new: trtp.TensorDesc, v_new: trtp.TensorDesc, k_pool: trtp.TensorDesc, v_pool: trtp.TensorDesc,
             slot_mapping: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc], tactic: int
             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        num_kv_heads = k_new.shape_expr[1].constant_value()
        head_dim = k_new.shape_expr[2].constant_value()
        name, ptx, threads, shared = aot_compile(torch_dtype_of(trt, k_new.dtype), torch_dtype_of(trt, k_pool.dtype),
                                                 num_kv_heads, head_dim, tactic)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = launch_grid(k_new.shape_expr[0])
        launch.block_x, launch.shared_mem = threads, shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(num_kv_heads * head_dim), trtp.SymInt32(head_dim)])
        return name.encode(), ptx.encode(), launch, extra


__all__ = ["kv_append_reference", "kv_append_triton", "register_tensorrt_plugin", "aot_compile"]

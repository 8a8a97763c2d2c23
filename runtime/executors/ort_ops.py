"""The plugin ops' contrib form for onnxruntime: Python implementations, through onnxruntime-extensions, of
``paged_attention``, ``kv_append`` and the decision ops ``draft_verify`` (greedy) and ``confidence_unmask`` (the
plugins' torch references) and of the tensor-parallel all-reduce of the reference-form graphs (this process's
``TPComm``). ``confidence_unmask`` takes its ``is_masked`` input as bool (``PyCustomOpDef.dt_bool``).

The onnxruntime executor registers them for ``--tp`` engine directories (their reference graphs all-reduce
through a contrib op); ``trimode.build.plugin_ops.contrib_session`` uses them to run the very plugin-form graph
handed to TensorRT on CPU (docs/kernels.md). Slow (one Python call per node), exact.
"""

from __future__ import annotations

import threading

import numpy as np

CONTRIB_DOMAIN = "ai.onnx.contrib"
REFERENCE_ALL_REDUCE = "tp_all_reduce"

_TP_COMMS: dict[int, object] = {}  # rank -> TPComm (one per process; one per thread in the thread-rank tests)


def register_tp_comm(comm) -> None:
    """Make ``comm`` the communicator of the reference graphs of rank ``comm.rank`` in this process."""
    _TP_COMMS[comm.rank] = comm


def unregister_tp_comm(comm) -> None:
    if _TP_COMMS.get(comm.rank) is comm:
        del _TP_COMMS[comm.rank]


def _reference_all_reduce(x: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    import torch

    comm = _TP_COMMS.get(rank)
    if comm is None or comm.world_size != world_size:
        raise RuntimeError(f"tp_all_reduce: no tensor-parallel communicator of rank {rank}/{world_size} is "
                           f"registered in this process (the executor registers it: register_tp_comm)")
    return comm.all_reduce(torch.from_numpy(np.array(x, dtype=np.float32, copy=True))).numpy()


_ORT_REGISTERED = False
_REGISTER_LOCK = threading.Lock()


def register_ort_contrib_ops() -> None:
    """Python implementations of the plugin ops for onnxruntime-extensions (the plugins' torch references)."""
    with _REGISTER_LOCK:  # two threads registering at once (thread ranks) leave onnxruntime a freed kernel
        _register_ort_contrib_ops()


def _register_ort_contrib_ops() -> None:
    global _ORT_REGISTERED
    if _ORT_REGISTERED:
        return
    import torch
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    # imported here: the kernel modules import Triton, which must not load before a test sets TRITON_INTERPRET
    from trimode.plugins.confidence_unmask import confidence_unmask_reference
    from trimode.plugins.draft_verify import draft_verify_greedy_reference
    from trimode.plugins.kv_append import kv_append_reference
    from trimode.plugins.paged_attention import paged_attention_reference

    f, i32, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int64
    boolean = PyCustomOpDef.dt_bool

    @onnx_op(op_type="paged_attention", inputs=[f, f, f, f, f, i32, i32, i32], outputs=[f],
             attrs={"is_causal": i64, "scale": f, "page_size": i64})
    def _paged_attention(q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start, **attrs):
        t = [torch.from_numpy(np.ascontiguousarray(x)) for x in
             (q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start)]
        out = paged_attention_reference(*t, is_causal=bool(attrs["is_causal"]), scale=float(attrs["scale"]),
                                        page_size=int(attrs["page_size"]))
        return out.numpy()

    @onnx_op(op_type="kv_append", inputs=[f, f, f, f, i64], outputs=[f, f])
    def _kv_append(k_new, v_new, k_pool, v_pool, slot_mapping):
        k_out, v_out = torch.from_numpy(k_pool.copy()), torch.from_numpy(v_pool.copy())
        k_new, v_new, slots = (torch.from_numpy(np.ascontiguousarray(x)) for x in (k_new, v_new, slot_mapping))
        kv_append_reference(k_new, v_new, k_out, v_out, slots)
        return k_out.numpy(), v_out.numpy()

    def tensor(x: np.ndarray) -> torch.Tensor:
        # onnxruntime hands empty inputs over with zero strides, which the ops' checks refuse: a fresh empty tensor
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t if t.numel() else torch.empty(t.shape, dtype=t.dtype)

    @onnx_op(op_type="draft_verify", inputs=[i32, f, i32], outputs=[i32, i32], attrs={"mask_token_id": i64})
    def _draft_verify(draft_tokens, target_logits, draft_lens, **attrs):
        accepted, bonus = draft_verify_greedy_reference(tensor(draft_tokens), tensor(target_logits),
                                                        tensor(draft_lens), int(attrs["mask_token_id"]))
        return accepted.numpy(), bonus.numpy()

    @onnx_op(op_type="confidence_unmask", inputs=[f, boolean], outputs=[i32, f], attrs={"mask_token_id": i64})
    def _confidence_unmask(logits, is_masked, **attrs):
        tokens, confidence = confidence_unmask_reference(tensor(logits), tensor(np.asarray(is_masked, dtype=bool)),
                                                         int(attrs["mask_token_id"]))
        return tokens.numpy(), confidence.float().numpy()

    @onnx_op(op_type=REFERENCE_ALL_REDUCE, inputs=[f], outputs=[f], attrs={"rank": i64, "world_size": i64})
    def _all_reduce(x, **attrs):
        return _reference_all_reduce(x, int(attrs["rank"]), int(attrs["world_size"]))

    _ORT_REGISTERED = True

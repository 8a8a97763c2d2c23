"""One ONNX graph per engine kind, written directly from the checkpoint's tensors (no tracing).

The graph computes ``runtime/model/network.py``'s forward over the shared paged KV cache, with the interface every
executor binds (names fixed here, shapes symbolic):

| input                       | type / shape                         | kinds                  |
|-----------------------------|--------------------------------------|------------------------|
| `input_ids`                 | int64 [T]                            | all                    |
| `positions`                 | int64 [T]                            | all                    |
| `block_tables`              | int32 [N, max_pages] (padding -1)    | all                    |
| `context_lens`              | int32 [N]                            | all                    |
| `query_start`               | int32 [N + 1]                        | all                    |
| `logits_index`              | int64 [R] (rows whose logits return) | all                    |
| `lora_mask`                 | float [T] (1 = drafter LoRA on)      | draft                  |
| `slot_mapping`              | int64 [T] (page * page_size + row)   | kept kinds             |
| `k_pool.{l}` / `v_pool.{l}` | float [P, page_size, Hkv, D]         | all                    |
| `is_causal`                 | bool scalar                          | unified only           |
| `decide_index`              | int64 [Q] (rows the decisions read)  | all (tp 1)             |
| `verify_gather`             | int64 [Nd * Bd]                      | causal, unified (tp 1) |
| `draft_tokens`              | int32 [Nd, Bd - 1] (padding -1)      | causal, unified (tp 1) |
| `draft_lens`                | int32 [Nd]                           | causal, unified (tp 1) |

Outputs: ``logits`` float [R, V]; at tensor-parallel size 1 the decisions (``build/onnx_decisions.py``): causal
kinds ``accepted`` / ``bonus`` int32 [Nd] (``draft_verify`` greedy), the draft kind ``unmask_tokens`` int32 [Q] /
``unmask_confidence`` float [Q] (``confidence_unmask``), the unified graph all four; kept kinds also
``k_pool_out.{l}`` / ``v_pool_out.{l}``, the updated pools:
the runtime binds them to the same memory as ``k_pool.{l}`` (in place; the pool is never copied). One input
per layer lets every executor bind a slice of the runtime's one ``[layers, pages, ...]`` pool by address.
``logits_index`` and the decision inputs may be empty (R, Q, Nd = 0; Bd - 1 = 0 for passes without drafts).

Forms: ``plugin`` (attention and KV append are ``trimode`` plugin nodes, docs/kernels.md) for TensorRT, and
``reference`` (the same two ops decomposed into standard ONNX ops: each sequence's prefix gathered once per layer
through its block table, its new tokens padded to the batch's longest, masked softmax, ScatterND into the pool)
for onnxruntime on CPU. The ``unified`` plugin graph serves every kind in
one TensorRT engine: ``is_causal`` picks one of two attention nodes through an ``If``, ``kv_append`` writes
nothing for slot -1 (draft) and the LoRA is gated by ``lora_mask``.

Quantized linears carry Q/DQ: FP8 ``QuantizeLinear``/``DequantizeLinear`` on the input and a float8 weight
with its scale; INT4 AWQ as an int4 weight with blocked ``DequantizeLinear`` (axis 0 of the [in, out] weight,
block = group size) after the ``pre_quant_scale`` multiply; FP8 KV as Q/DQ on K and V before attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from trimode.build.onnx_decisions import add_decision_tail, decision_io
from trimode.build.plugin_ops import (COLLECTIVE_OPSET, PLUGIN_NAMESPACE, collective_node, plugin_attributes,
                         register_onnx_schemas)
from trimode.runtime.executors.engine_kinds import ENGINE_KINDS
from trimode.runtime.model.config import ModelConfig
from trimode.runtime.model.quantized import linear_format, unpack_int4
from trimode.runtime.model.rope import rope_frequencies

OPSET = 21
# The graphs' version: part of a build's key (build/pipeline.py), so engine directories written with other graphs
# are rebuilt. 2: the reference form gathers each sequence's prefix once per layer (1: once per token). 3: the
# decision tail (decide_index, verify_gather, draft_tokens, draft_lens -> accepted / bonus, unmask_tokens /
# unmask_confidence; build/onnx_decisions.py).
GRAPH_VERSION = 3
FLOAT = TensorProto.FLOAT
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@dataclass
class ModelWeights:
    """What a graph is built from: the config, the checkpoint's tensors as stored (float, fp8 or packed int4)
    and the drafter LoRA (A [r, in], B [out, r] per layer, and its scale)."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    lora: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    lora_scale: float = 1.0
    kv_scales: dict[str, float] = field(default_factory=dict)
    tp_rank: int = 0  # a tensor-parallel shard (build/sharding.py): rank tp_rank of tp_size
    tp_size: int = 1


def pack_int4_rows(q: np.ndarray) -> bytes:
    """ONNX INT4 raw data: elements in row-major order, two per byte, the first in the low nibble."""
    flat = q.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    return ((flat[0::2] & 0x0F) | ((flat[1::2] & 0x0F) << 4)).astype(np.uint8).tobytes()


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, TensorProto] = {}
        self._n = 0

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
           outputs: list[str] | None = None, **attrs):
        outs = outputs or [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name or self.fresh(op_type), domain=domain,
                                           **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, name: str, array: np.ndarray | TensorProto) -> str:
        if name not in self.inits:
            self.inits[name] = array if isinstance(array, TensorProto) else numpy_helper.from_array(array, name)
        return name

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = f"const_{arr.dtype}_{'x'.join(map(str, arr.shape))}_{'_'.join(map(str, arr.reshape(-1).tolist()))}"
        return self.init(key.replace("-", "m").replace(".", "p"), arr)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class GraphBuilder:
    """Builds the graph of one engine kind (or the unified graph) in one form."""

    def __init__(self, weights: ModelWeights, kind: str, form: str, page_size: int) -> None:
        assert form in ("plugin", "reference"), form
        assert kind in ENGINE_KINDS or (kind == "unified" and form == "plugin"), (kind, form)
        self.w, self.cfg, self.kind, self.form, self.page_size = weights, weights.config, kind, form, page_size
        self.unified = kind == "unified"
        spec = ENGINE_KINDS.get(kind)
        self.is_causal = spec.is_causal if spec else None
        self.keeps_kv = spec.keeps_kv if spec else True
        self.has_lora = (spec.has_lora if spec else True) and weights.lora is not None
        self.tp_rank, self.tp_size = weights.tp_rank, weights.tp_size
        self.hq = self.cfg.num_attention_heads // self.tp_size  # this rank's heads and vocabulary slice
        self.hkv = self.cfg.num_key_value_heads // self.tp_size
        self.vocab = self.cfg.vocab_size // self.tp_size
        self.g = _Graph()

    # ---- building blocks ------------------------------------------------------------------------------

    def linear(self, x: str, name: str) -> str:
        t, g = self.w.tensors, self.g
        fmt = linear_format(t, name)
        if fmt.kind == "float":
            return g.op("MatMul", [x, g.init(f"{name}.weight.T", _f32(t[f"{name}.weight"]).T.copy())])
        if fmt.kind == "fp8":
            w8 = t[f"{name}.weight"].T.contiguous()
            wt = helper.make_tensor(f"{name}.weight.T", TensorProto.FLOAT8E4M3FN, list(w8.shape),
                                    w8.view(torch.uint8).numpy().tobytes(), raw=True)
            w_scale = g.init(f"{name}.weight_scale", _f32(t[f"{name}.weight_scale"]).reshape(()))
            x_scale = g.init(f"{name}.input_scale", _f32(t[f"{name}.input_scale"]).reshape(()))
            xq = g.op("QuantizeLinear", [x, x_scale, self._fp8_zero()])
            xd = g.op("DequantizeLinear", [xq, x_scale])
            wd = g.op("DequantizeLinear", [g.init(f"{name}.weight.T", wt), w_scale])
            return g.op("MatMul", [xd, wd])
        # int4 AWQ: weight [in, out] int4, scales [in / group, out], blocked along axis 0
        if fmt.has_pre_quant_scale:
            x = g.op("Mul", [x, g.init(f"{name}.pre_quant_scale", _f32(t[f"{name}.pre_quant_scale"]))])
        q = unpack_int4(t[f"{name}.weight"]).numpy().T  # [in, out]
        wt = helper.make_tensor(f"{name}.weight.T", TensorProto.INT4, list(q.shape), pack_int4_rows(q), raw=True)
        scale = g.init(f"{name}.weight_scale.T", _f32(t[f"{name}.weight_scale"]).T.copy())
        wd = g.op("DequantizeLinear", [g.init(f"{name}.weight.T", wt), scale], axis=0, block_size=fmt.group_size)
        return g.op("MatMul", [x, wd])

    def _fp8_zero(self) -> str:
        return self.g.init("fp8_zero", helper.make_tensor("fp8_zero", TensorProto.FLOAT8E4M3FN, [], [0.0]))

    def rms_norm(self, x: str, weight_name: str) -> str:
        g = self.g
        ms = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1])], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(self.cfg.rms_norm_eps, np.float32)])])])
        return g.op("Mul", [g.op("Mul", [x, inv]), g.init(weight_name, _f32(self.w.tensors[weight_name]))])

    def rope(self, x: str, cos: str, sin: str) -> str:
        g, half = self.g, self.cfg.head_dim // 2
        lo = g.op("Slice", [x, g.const([0]), g.const([half]), g.const([-1])])
        hi = g.op("Slice", [x, g.const([half]), g.const([2 * half]), g.const([-1])])
        rotated = g.op("Concat", [g.op("Neg", [hi]), lo], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])

    # ---- attention: plugin nodes or their decomposition -------------------------------------------------

    def attention(self, layer: int, q: str, k: str, v: str, kp: str, vp: str) -> str:
        if self.form == "reference":
            return self._attention_reference(q, k, v, kp, vp)
        inputs = [q, k, v, kp, vp, "block_tables", "context_lens", "query_start"]
        common = dict(scale=float(self.cfg.softmax_scale), page_size=self.page_size, **plugin_attributes("paged_attention"))
        if not self.unified:
            return self.g.op("paged_attention", inputs, domain=PLUGIN_NAMESPACE, name=f"paged_attention_{layer}",
                             is_causal=int(self.is_causal), **common)
        out_info = [helper.make_tensor_value_info("", FLOAT, ["T", self.hq, self.cfg.head_dim])]
        branches = []
        for causal in (1, 0):
            out = f"attn_{layer}_{'causal' if causal else 'bidirectional'}"
            node = helper.make_node("paged_attention", inputs, [out], name=f"paged_attention_{layer}_{causal}",
                                    domain=PLUGIN_NAMESPACE, is_causal=causal, **common)
            out_info[0].name = out
            branches.append(helper.make_graph([node], f"branch_{layer}_{causal}", [], [copy_info(out_info[0])]))
        return self.g.op("If", ["is_causal"], then_branch=branches[0], else_branch=branches[1],
                         name=f"attention_{layer}")

    def _attention_precompute(self) -> None:
        """What every layer's reference attention shares: the ragged tokens laid out per sequence, padded to the
        longest (``pad_gather`` [N, Tmax] token of each padded row, ``unpad_index`` [T] padded row of each token),
        each sequence's prefix slots ``prefix_slots`` [N, C] (C = the longest committed prefix, not the block
        tables' width) and the additive mask ``attn_bias`` [N, 1, Tmax * G, C + Tmax] (rows: token-major, then
        the query heads of one KV head)."""
        g, S, grp = self.g, self.page_size, self.cfg.num_queries_per_kv
        i64, big = TensorProto.INT64, np.iinfo(np.int64).max
        num_tokens = g.op("Shape", ["input_ids"])  # [1]
        tidx = g.op("Range", [g.const(0), g.op("Squeeze", [num_tokens, g.const([0])]), g.const(1)])  # [T]
        qs = g.op("Cast", ["query_start"], to=i64)
        qs_begin = g.op("Slice", [qs, g.const([0]), g.const([-1]), g.const([0])])  # [N]
        qs_end = g.op("Slice", [qs, g.const([1]), g.const([big]), g.const([0])])
        lens = g.op("Sub", [qs_end, qs_begin])  # [N] new tokens per sequence
        max_len = g.op("ReduceMax", [lens, g.const([0])], keepdims=1)  # [1] = Tmax
        ge = g.op("GreaterOrEqual", [g.op("Unsqueeze", [tidx, g.const([1])]),
                                     g.op("Unsqueeze", [qs_end, g.const([0])])])
        tok_seq = g.op("ReduceSum", [g.op("Cast", [ge], to=i64), g.const([1])], keepdims=0)  # [T]
        tok_pos = g.op("Sub", [tidx, g.op("Gather", [qs_begin, tok_seq])])  # [T] index within its sequence
        self.unpad_index = g.op("Add", [g.op("Mul", [tok_seq, max_len]), tok_pos])  # [T] row of [N * Tmax]
        jr = g.op("Range", [g.const(0), g.op("Squeeze", [max_len, g.const([0])]), g.const(1)])  # [Tmax]
        row = g.op("Unsqueeze", [jr, g.const([0])])  # [1, Tmax]
        gather = g.op("Add", [g.op("Unsqueeze", [qs_begin, g.const([1])]), row])  # [N, Tmax]
        # padded rows repeat a real token (clipped); their keys are masked out and their outputs dropped
        self.pad_gather = g.op("Min", [gather, g.op("Sub", [num_tokens, g.const([1])])])
        new_ok = g.op("Less", [row, g.op("Unsqueeze", [lens, g.const([1])])])  # [N, Tmax] real new keys
        ctx = g.op("Cast", ["context_lens"], to=i64)
        max_ctx = g.op("ReduceMax", [ctx, g.const([0])], keepdims=1)  # [1] = C
        cidx = g.op("Range", [g.const(0), g.op("Squeeze", [max_ctx, g.const([0])]), g.const(1)])  # [C]
        tables = g.op("Cast", ["block_tables"], to=i64)  # [N, max_pages]
        pages = g.op("Gather", [tables, g.op("Div", [cidx, g.const(S)])], axis=1)  # [N, C]
        slots = g.op("Add", [g.op("Mul", [pages, g.const(S)]), g.op("Mod", [cidx, g.const(S)])])
        prefix_ok = g.op("Less", [g.op("Unsqueeze", [cidx, g.const([0])]), g.op("Unsqueeze", [ctx, g.const([1])])])
        self.prefix_slots = g.op("Where", [prefix_ok, slots, g.const(0)])  # [N, C]
        num_seqs = g.op("Shape", ["context_lens"])
        prefix_vis = g.op("Expand", [g.op("Unsqueeze", [prefix_ok, g.const([1])]),
                                     g.op("Concat", [num_seqs, max_len, max_ctx], axis=0)])  # [N, Tmax, C]
        new_vis = g.op("Unsqueeze", [new_ok, g.const([1])])  # [N, 1, Tmax] (key j)
        if self.is_causal:  # key j <= query t within the sequence
            new_vis = g.op("And", [new_vis, g.op("LessOrEqual", [row, g.op("Unsqueeze", [jr, g.const([1])])])])
        else:
            new_vis = g.op("Expand", [new_vis, g.op("Concat", [num_seqs, max_len, max_len], axis=0)])
        visible = g.op("Concat", [prefix_vis, new_vis], axis=2)  # [N, Tmax, C + Tmax]
        bias = g.op("Where", [visible, g.const(0.0, np.float32), g.const(-1e30, np.float32)])
        bias = g.op("Expand", [g.op("Unsqueeze", [bias, g.const([2])]), g.const([1, 1, grp, 1])])
        self.attn_bias = g.op("Reshape", [bias, g.const([0, 1, -1, 0])])  # [N, 1, Tmax * G, C + Tmax]

    def _attention_reference(self, q: str, k: str, v: str, kp: str, vp: str) -> str:
        """Per sequence, as the plugin does: its prefix is gathered once per layer ([N, C, Hkv, D], not once
        per token), scores [N, Hkv, Tmax * G, C + Tmax] by MatMul, softmax, MatMul; back to the ragged rows."""
        g, cfg = self.g, self.cfg
        hkv, grp, d = self.hkv, cfg.num_queries_per_kv, cfg.head_dim
        flat = g.const([-1, hkv, d])
        k_all = g.op("Concat", [g.op("Gather", [g.op("Reshape", [kp, flat]), self.prefix_slots]),
                                g.op("Gather", [k, self.pad_gather])], axis=1)  # [N, C + Tmax, Hkv, D]
        v_all = g.op("Concat", [g.op("Gather", [g.op("Reshape", [vp, flat]), self.prefix_slots]),
                                g.op("Gather", [v, self.pad_gather])], axis=1)
        q_pad = g.op("Reshape", [g.op("Gather", [g.op("Mul", [q, g.const(cfg.softmax_scale, np.float32)]),
                                                 self.pad_gather]), g.const([0, 0, hkv, grp, d])])
        q_rows = g.op("Reshape", [g.op("Transpose", [q_pad], perm=[0, 2, 1, 3, 4]),
                                  g.const([0, 0, -1, d])])  # [N, Hkv, Tmax * G, D]
        scores = g.op("Add", [g.op("MatMul", [q_rows, g.op("Transpose", [k_all], perm=[0, 2, 3, 1])]),
                              self.attn_bias])
        probs = g.op("Softmax", [scores], axis=-1)
        out = g.op("MatMul", [probs, g.op("Transpose", [v_all], perm=[0, 2, 1, 3])])  # [N, Hkv, Tmax * G, D]
        out = g.op("Transpose", [g.op("Reshape", [out, g.const([0, 0, -1, grp, d])])], perm=[0, 2, 1, 3, 4])
        return g.op("Gather", [g.op("Reshape", [out, g.const([-1, self.hq, d])]), self.unpad_index])

    def kv_append(self, layer: int, k: str, v: str, kp: str, vp: str) -> None:
        g = self.g
        outs = [f"k_pool_out.{layer}", f"v_pool_out.{layer}"]
        if self.form == "plugin":
            g.op("kv_append", [k, v, kp, vp, "slot_mapping"], n_out=2, domain=PLUGIN_NAMESPACE,
                 name=f"kv_append_{layer}", outputs=outs, **plugin_attributes("kv_append"))
            return
        if not hasattr(self, "scatter_index"):  # [T, 2] = (page, row); ScatterND writes straight into the pool
            S = g.const(self.page_size)
            self.scatter_index = g.op("Concat", [g.op("Unsqueeze", [g.op("Div", ["slot_mapping", S]), g.const([1])]),
                                                 g.op("Unsqueeze", [g.op("Mod", ["slot_mapping", S]), g.const([1])])],
                                      axis=1)
        g.op("ScatterND", [kp, self.scatter_index, k], outputs=[outs[0]], name=f"k_append_{layer}")
        g.op("ScatterND", [vp, self.scatter_index, v], outputs=[outs[1]], name=f"v_append_{layer}")

    def kv_fake_quant(self, x: str, scale_name: str) -> str:
        g = self.g
        scale = g.init(scale_name, np.asarray(self.w.kv_scales[scale_name], np.float32))
        return g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, scale, self._fp8_zero()]), scale])

    # ---- tensor parallelism (build/sharding.py) ---------------------------------------------------------

    def embedding(self) -> str:
        """Token embeddings; under --tp this rank's vocabulary rows (other ids give 0) and an all-reduce."""
        g = self.g
        embed = g.init("encoder.embed_tokens.weight", _f32(self.w.tensors["encoder.embed_tokens.weight"]))
        if self.tp_size == 1:
            return g.op("Gather", [embed, "input_ids"])
        local = g.op("Sub", ["input_ids", g.const(self.tp_rank * self.vocab)])
        inside = g.op("And", [g.op("GreaterOrEqual", [local, g.const(0)]), g.op("Less", [local, g.const(self.vocab)])])
        rows = g.op("Gather", [embed, g.op("Where", [inside, local, g.const(0)])])
        keep = g.op("Unsqueeze", [g.op("Cast", [inside], to=FLOAT), g.const([1])])
        return self.all_reduce(g.op("Mul", [rows, keep]), "embedding")

    def all_reduce(self, x: str, where: str) -> str:
        """Sum of ``x`` over the tensor-parallel ranks (nothing at tp 1): a row-parallel layer's reduce."""
        if self.tp_size == 1:
            return x
        op_type, domain, attrs = collective_node(self.form, self.tp_rank, self.tp_size)
        return self.g.op(op_type, [x], domain=domain, name=f"all_reduce_{where}", **attrs)

    # ---- the model --------------------------------------------------------------------------------------

    def build(self) -> onnx.ModelProto:
        cfg, g = self.cfg, self.g
        hq, hkv, d, L = self.hq, self.hkv, cfg.head_dim, cfg.num_hidden_layers
        if self.form == "reference":
            self._attention_precompute()
        h = self.embedding()
        inv_freq, attention_factor = rope_frequencies(cfg.rope, d)
        freqs = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", ["positions"], to=FLOAT), g.const([1])]),
                             g.init("rope.inv_freq", inv_freq.numpy().astype(np.float32))])
        emb = g.op("Concat", [freqs, freqs], axis=1)
        af = g.const(attention_factor, np.float32)
        cos = g.op("Unsqueeze", [g.op("Mul", [g.op("Cos", [emb]), af]), g.const([1])])  # [T, 1, D]
        sin = g.op("Unsqueeze", [g.op("Mul", [g.op("Sin", [emb]), af]), g.const([1])])
        q_scale = None
        if cfg.rope.llama_4_scaling_beta:
            orig = g.const(float(cfg.rope.original_max_position_embeddings), np.float32)
            floor = g.op("Floor", [g.op("Div", [g.op("Cast", ["positions"], to=FLOAT), orig])])
            scale = g.op("Add", [g.const(1.0, np.float32), g.op("Mul", [
                g.const(cfg.rope.llama_4_scaling_beta, np.float32),
                g.op("Log", [g.op("Add", [floor, g.const(1.0, np.float32)])])])])
            q_scale = g.op("Unsqueeze", [scale, g.const([1, 2])])
        lora_gate = None
        if self.has_lora:
            lora_gate = g.op("Unsqueeze", [g.op("Mul", ["lora_mask", g.const(self.w.lora_scale, np.float32)]),
                                           g.const([1])])
        for i in range(L):
            p = f"encoder.layers.{i}."
            x = self.rms_norm(h, p + "input_layernorm.weight")
            q = g.op("Reshape", [self.linear(x, p + "self_attn.q_proj"), g.const([-1, hq, d])])
            k = g.op("Reshape", [self.linear(x, p + "self_attn.k_proj"), g.const([-1, hkv, d])])
            v = g.op("Reshape", [self.linear(x, p + "self_attn.v_proj"), g.const([-1, hkv, d])])
            q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
            if q_scale is not None:
                q = g.op("Mul", [q, q_scale])
            if self.w.kv_scales:
                k = self.kv_fake_quant(k, p + "self_attn.k_proj.k_scale")
                v = self.kv_fake_quant(v, p + "self_attn.v_proj.v_scale")
            kp, vp = f"k_pool.{i}", f"v_pool.{i}"
            o = g.op("Reshape", [self.attention(i, q, k, v, kp, vp), g.const([-1, hq * d])])
            if self.keeps_kv:
                self.kv_append(i, k, v, kp, vp)
            out = self.linear(o, p + "self_attn.o_proj")
            if lora_gate is not None:
                a, b = self.w.lora[i]
                delta = g.op("MatMul", [g.op("MatMul", [o, g.init(f"lora.{i}.A.T", _f32(a).T.copy())]),
                                        g.init(f"lora.{i}.B.T", _f32(b).T.copy())])
                out = g.op("Add", [out, g.op("Mul", [delta, lora_gate])])
            h = g.op("Add", [h, self.all_reduce(out, f"attention_{i}")])
            x = self.rms_norm(h, p + "post_attention_layernorm.weight")
            gate = self.linear(x, p + "mlp.gate_proj")
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), self.linear(x, p + "mlp.up_proj")])
            h = g.op("Add", [h, self.all_reduce(self.linear(act, p + "mlp.down_proj"), f"mlp_{i}")])
        rows = self.rms_norm(g.op("Gather", [h, "logits_index"]), "encoder.norm.weight")
        logits = self.linear(rows, "diffusion_head")
        g.op("Identity", [logits], outputs=["logits"])
        if self.tp_size == 1:  # under --tp a rank holds a vocabulary slice: it cannot decide
            add_decision_tail(self, h)
        return self._model()

    def _model(self) -> onnx.ModelProto:
        cfg, S = self.cfg, self.page_size
        hkv, d = self.hkv, cfg.head_dim
        vi = helper.make_tensor_value_info
        pool = ["num_pages", S, hkv, d]
        inputs = [vi("input_ids", TensorProto.INT64, ["T"]), vi("positions", TensorProto.INT64, ["T"]),
                  vi("block_tables", TensorProto.INT32, ["N", "max_pages"]),
                  vi("context_lens", TensorProto.INT32, ["N"]), vi("query_start", TensorProto.INT32, ["N_plus_1"]),
                  vi("logits_index", TensorProto.INT64, ["R"])]
        if self.has_lora:
            inputs.append(vi("lora_mask", FLOAT, ["T"]))
        if self.keeps_kv:
            inputs.append(vi("slot_mapping", TensorProto.INT64, ["T"]))
        if self.unified:
            inputs.append(vi("is_causal", TensorProto.BOOL, []))
        for i in range(cfg.num_hidden_layers):
            inputs += [vi(f"k_pool.{i}", FLOAT, pool), vi(f"v_pool.{i}", FLOAT, pool)]
        outputs = [vi("logits", FLOAT, ["R", self.vocab])]  # under --tp: this rank's vocabulary slice
        if self.tp_size == 1:
            decision_inputs, decision_outputs = decision_io(self.kind, self.is_causal)
            inputs += decision_inputs
            outputs += decision_outputs
        if self.keeps_kv:
            for i in range(cfg.num_hidden_layers):
                outputs += [vi(f"k_pool_out.{i}", FLOAT, pool), vi(f"v_pool_out.{i}", FLOAT, pool)]
        name = f"trimode_{self.kind}_{self.form}" + (f"_rank{self.tp_rank}of{self.tp_size}" if self.tp_size > 1 else "")
        graph = helper.make_graph(self.g.nodes, name, inputs, outputs,
                                  initializer=list(self.g.inits.values()))
        opsets = [helper.make_opsetid("", OPSET)]
        if self.form == "plugin":
            register_onnx_schemas()
            opsets.append(helper.make_opsetid(PLUGIN_NAMESPACE, 1))
        if self.tp_size > 1 and COLLECTIVE_OPSET[self.form] is not None:
            opsets.append(helper.make_opsetid(*COLLECTIVE_OPSET[self.form]))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="trimode.build")
        model.ir_version = 10
        return model


def copy_info(info: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    return out


def build_graph(weights: ModelWeights, kind: str, form: str, page_size: int) -> onnx.ModelProto:
    return GraphBuilder(weights, kind, form, page_size).build()

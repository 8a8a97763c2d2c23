"""The plugin ops as ONNX sees them (docs/kernels.md): names, namespace, version, schemas, and the contrib form.

Plugin form: nodes in domain ``trimode`` whose op type is the TensorRT plugin name, with the string attributes
``plugin_namespace`` = "trimode" and ``plugin_version`` = "1" that TensorRT's ONNX parser uses to find the
plugin in its registry. ``register_onnx_schemas`` teaches ``onnx.checker`` / shape inference these ops.

Contrib form (``contrib_form``): the same graph with the nodes moved to domain ``ai.onnx.contrib`` and run by
onnxruntime through onnxruntime-extensions with the plugins' torch references as Python implementations
(``register_ort_contrib_ops``), so the very graph handed to TensorRT is checked on CPU. Slow (one Python call
per node): for tests. The executor runs the reference form instead (standard ONNX ops, ``onnx_graph.py``).
"""

from __future__ import annotations

import copy

from trimode.plugins import PLUGIN_NAMESPACE, PLUGIN_VERSIONS
from trimode.runtime.executors.ort_ops import CONTRIB_DOMAIN, REFERENCE_ALL_REDUCE, register_ort_contrib_ops

FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
POOL_TYPES = FLOAT_TYPES + ["tensor(float8e4m3fn)"]


def plugin_attributes(op: str) -> dict[str, str]:
    """The attributes TensorRT's ONNX parser reads to find plugin ``op`` in its registry."""
    return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSIONS[op]}


def register_onnx_schemas() -> None:
    """Register ``trimode::paged_attention``, ``kv_append``, ``draft_verify`` (greedy) and ``confidence_unmask``
    and the default-domain ``DistCollective`` with onnx (idempotent)."""
    from onnx import defs

    if defs.has("confidence_unmask", PLUGIN_NAMESPACE):
        return
    P = defs.OpSchema.FormalParameter
    A = defs.OpSchema.Attribute
    AT = defs.OpSchema.AttrType
    plugin_attrs = [A("plugin_namespace", AT.STRING, "TensorRT plugin namespace", required=False),
                    A("plugin_version", AT.STRING, "TensorRT plugin version", required=False)]
    pools = [P("k_pool", "TP", "one layer [num_pages, page_size, Hkv, D]"), P("v_pool", "TP", "one layer")]
    attention = defs.OpSchema(
        "paged_attention", PLUGIN_NAMESPACE, 1, "Paged attention over the shared KV pool (docs/kernels.md).",
        inputs=[P("q", "T", "[T_total, Hq, D]"), P("k_new", "T", "[T_total, Hkv, D]"),
                P("v_new", "T", "[T_total, Hkv, D]"),
                *pools, P("block_tables", "tensor(int32)", "[num_seqs, max_pages]"),
                P("context_lens", "tensor(int32)", "[num_seqs]"), P("query_start", "tensor(int32)", "[num_seqs + 1]")],
        outputs=[P("out", "T", "[T_total, Hq, D]")],
        type_constraints=[("T", FLOAT_TYPES, "activations"), ("TP", POOL_TYPES, "KV pool")],
        attributes=[A("is_causal", AT.INT, "1 causal, 0 block-bidirectional"), A("scale", AT.FLOAT, "softmax scale"),
                    A("page_size", AT.INT, "tokens per page"), *plugin_attrs])
    append = defs.OpSchema(
        "kv_append", PLUGIN_NAMESPACE, 1, "Write kept K/V into their pool slots, in place (docs/kernels.md).",
        inputs=[P("k_new", "T", "[T_total, Hkv, D]"), P("v_new", "T", "[T_total, Hkv, D]"), *pools,
                P("slot_mapping", "tensor(int64)", "[T_total], -1 = not written")],
        outputs=[P("k_pool_out", "TP", "k_pool, updated (aliased)"), P("v_pool_out", "TP", "v_pool, updated")],
        type_constraints=[("T", FLOAT_TYPES, "activations"), ("TP", POOL_TYPES, "KV pool")],
        attributes=plugin_attrs)
    collective = defs.OpSchema(
        TRT_COLLECTIVE, "", 1, "TensorRT's NCCL collective (IDistCollectiveLayer); here: the tensor-parallel sum.",
        inputs=[P("input", "T", "this rank's partial sum")], outputs=[P("output", "T", "the sum over the ranks")],
        type_constraints=[("T", FLOAT_TYPES, "activations")],
        attributes=[A("collective_operation", AT.STRING, "all_reduce"), A("reduce_op", AT.STRING, "sum"),
                    A("root", AT.INT, "-1: no root"), A("nb_rank", AT.INT, "ranks"),
                    A("group_size", AT.INT, "ranks", required=False),
                    A("groups", AT.INTS, "participating ranks", required=False)])
    mask_id = A("mask_token_id", AT.INT, "excluded from the argmax")
    verify = defs.OpSchema(
        "draft_verify", PLUGIN_NAMESPACE, 1, "Greedy acceptance of draft tokens (docs/kernels.md).",
        inputs=[P("draft_tokens", "tensor(int32)", "[num_seqs, B - 1]"), P("target_logits", "T", "[num_seqs, B, V]"),
                P("draft_lens", "tensor(int32)", "[num_seqs]")],
        outputs=[P("accepted", "tensor(int32)", "[num_seqs] matched drafts + 1"),
                 P("bonus", "tensor(int32)", "[num_seqs] target token after the last match")],
        type_constraints=[("T", FLOAT_TYPES, "logits")], attributes=[mask_id, *plugin_attrs])
    unmask = defs.OpSchema(
        "confidence_unmask", PLUGIN_NAMESPACE, 1, "Argmax and its confidence per masked row (docs/kernels.md).",
        inputs=[P("logits", "T", "[N, V]"), P("is_masked", "tensor(bool)", "[N], false: row not read")],
        outputs=[P("tokens", "tensor(int32)", "[N] argmax, mask id excluded; -1 where not masked"),
                 P("confidence", "tensor(float)", "[N] softmax of the raw logits at that token; 0 where not masked")],
        type_constraints=[("T", FLOAT_TYPES, "logits")], attributes=[mask_id, *plugin_attrs])
    for schema in (attention, append, verify, unmask):
        if not defs.has(schema.name, PLUGIN_NAMESPACE):
            defs.register_schema(schema)
    if not defs.has(TRT_COLLECTIVE):
        defs.register_schema(collective)


# ---- tensor-parallel all-reduce ----------------------------------------------------------------------------

# The plugin form's all-reduce is TensorRT's own NCCL collective (TensorRT >= 11: the ONNX parser turns a
# default-domain ``DistCollective`` node into an IDistCollectiveLayer; attributes as Polygraphy's TP sharding
# writes them). The reference form's is a contrib op run by onnxruntime-extensions through this process's TPComm.
TRT_COLLECTIVE = "DistCollective"
COLLECTIVE_OPSET = {"plugin": None, "reference": (CONTRIB_DOMAIN, 1)}  # opset import each form needs


def collective_node(form: str, rank: int, world_size: int) -> tuple[str, str, dict]:
    """(op type, domain, attributes) of a sum all-reduce over ``world_size`` ranks in graph form ``form``."""
    if form == "plugin":
        return TRT_COLLECTIVE, "", {"collective_operation": "all_reduce", "reduce_op": "sum", "root": -1,
                                    "nb_rank": world_size, "group_size": world_size,
                                    "groups": list(range(world_size))}
    return REFERENCE_ALL_REDUCE, CONTRIB_DOMAIN, {"rank": rank, "world_size": world_size}


# ---- contrib form (onnxruntime + onnxruntime-extensions) -------------------------------------------------------

def contrib_form(model, tp_rank: int = 0):
    """A copy of a plugin-form model with the plugin nodes in ``ai.onnx.contrib`` (for onnxruntime-extensions);
    the ``DistCollective`` all-reduces of a ``--tp`` graph become rank ``tp_rank``'s contrib all-reduce."""
    from onnx import helper

    out = copy.deepcopy(model)

    def convert(graph) -> None:
        for node in graph.node:
            if node.op_type == TRT_COLLECTIVE and node.domain == "":
                world = next(a.i for a in node.attribute if a.name == "nb_rank")
                node.op_type, node.domain = REFERENCE_ALL_REDUCE, CONTRIB_DOMAIN
                del node.attribute[:]
                node.attribute.extend([helper.make_attribute("rank", tp_rank),
                                       helper.make_attribute("world_size", world)])
            if node.domain == PLUGIN_NAMESPACE:
                node.domain = CONTRIB_DOMAIN
                keep = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version")]
                del node.attribute[:]
                node.attribute.extend(keep)
            for attr in node.attribute:
                if attr.g.node:
                    convert(attr.g)

    convert(out.graph)
    opsets = [o for o in out.opset_import if o.domain != PLUGIN_NAMESPACE]
    del out.opset_import[:]
    out.opset_import.extend(opsets + [helper.make_opsetid(CONTRIB_DOMAIN, 1)])
    return out


def contrib_session(model, threads: int = 1, tp_rank: int = 0):
    """An onnxruntime session running a plugin-form model through its contrib form."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    register_ort_contrib_ops()
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(contrib_form(model, tp_rank).SerializeToString(), so, providers=["CPUExecutionProvider"])

"""The TensorRT plugin signatures of the ops (docs/kernels.md), shared by the two TensorRT forms: the
``tensorrt.plugin`` (QDP) definitions in each op's module (TensorRT 11) and the ``IPluginV3`` classes of
``plugins/trt_plugins.py`` (TensorRT-RTX and TensorRT 11). Imports nothing heavy (no Triton, no TensorRT)."""

from __future__ import annotations

# Per op: the type of each input and output, in order. "F" and "P" are type variables (every position with the
# same letter has one type, any of FLOAT_TYPES_TRT): "F" the activations, "P" the KV pool.
FLOAT_TYPES_TRT = ("FP32", "FP16", "BF16")
PLUGIN_SIGNATURES = {
    "paged_attention": (("F", "F", "F", "P", "P", "INT32", "INT32", "INT32"), ("F",)),
    "kv_append": (("F", "F", "P", "P", "INT64"), ("P", "P")),
    "draft_verify": (("INT32", "F", "INT32"), ("INT32", "INT32")),
    "draft_verify_sampling": (("INT32", "INT32", "F", "F", "FP32"), ("INT32", "INT32")),
    "confidence_unmask": (("F", "BOOL"), ("INT32", "FP32")),
}
# Outputs written in place: {op: {output index: input index}} (the output is the input's memory).
PLUGIN_ALIASES = {"kv_append": {0: 2, 1: 3}}
# Serialized attributes (the ONNX node's attributes, TensorRT plugin fields): {op: {name: int | float}}.
PLUGIN_FIELDS = {
    "paged_attention": {"is_causal": int, "scale": float, "page_size": int},
    "kv_append": {},
    "draft_verify": {"mask_token_id": int},
    "draft_verify_sampling": {},
    "confidence_unmask": {"mask_token_id": int},
}


def autotune_io(op: str) -> str:
    """The ``tensorrt.plugin`` AutoTuneCombination type string of ``op`` (inputs then outputs)."""
    ins, outs = PLUGIN_SIGNATURES[op]
    return ", ".join("|".join(FLOAT_TYPES_TRT) if t in ("F", "P") else t for t in ins + outs)

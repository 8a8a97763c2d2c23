"""The plugin ops as class-based TensorRT ``IPluginV3`` plugins (docs/kernels.md), for TensorRT-RTX and TensorRT 11.

One class per op (``paged_attention``, ``kv_append``, ``draft_verify``, ``draft_verify_sampling``,
``confidence_unmask``), implementing ``IPluginV3`` with the capability interfaces ``IPluginV3OneCore`` (name,
namespace ``trimode``, version), ``IPluginV3OneBuildV2`` (build logic: output shapes and data types, the
formats and type combinations it takes, its serialized fields, and the aliased input of an in-place output) and
``IPluginV3OneRuntime`` (``enqueue``: wraps TensorRT's device pointers as torch tensors on TensorRT's stream and
launches the op's Triton kernel from ``plugins/``), plus one ``IPluginCreatorV3One`` per op. The ONNX parser
finds a creator by the node's op type, ``plugin_namespace`` and ``plugin_version`` attributes
(``build/plugin_ops.py``); the node's attributes arrive as the plugin's fields.

``register(trt)`` registers the creators with the plugin registry of the TensorRT module ``trt``
(``tensorrt_rtx`` or ``tensorrt``): call it once in the process that builds an engine and once in the process
that runs one (TensorRT-RTX has no ``tensorrt.plugin`` and no embedded Python plugins: the creators must be
registered where the plan is deserialized). The type signatures, in-place outputs and fields come from
``plugins/signatures.py`` (``PLUGIN_SIGNATURES``, ``PLUGIN_ALIASES``, ``PLUGIN_FIELDS``), which the ``tensorrt.plugin``
(QDP) definitions of TensorRT 11 use too.

``kv_append`` writes the pool in place: outputs 0 / 1 alias inputs 2 / 3 (``get_aliased_input``; the builder
needs ``PreviewFeature.ALIASED_PLUGIN_IO_10_03``), which TensorRT accepts only when the aliased pool input has no
other consumer, so the graphs reach TensorRT wired kv-first (``build.trt_compile.wire_kv_first``).

What runs where: the build logic runs on any machine (the TensorRT-RTX builder calls it on CPU; it is tested
here with the real builder). ``enqueue`` needs a CUDA GPU and Triton; it was not executed on the project's
CPU machines (a TensorRT-RTX plan cannot be deserialized without a GPU).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from trimode.plugins import PLUGIN_NAMESPACE, PLUGIN_VERSIONS
from trimode.plugins.signatures import FLOAT_TYPES_TRT, PLUGIN_ALIASES, PLUGIN_FIELDS, PLUGIN_SIGNATURES


def plugin_version(op: str) -> str:
    """The version the exported graphs give ``op`` (``trimode.plugins.PLUGIN_VERSIONS``, declared once)."""
    return PLUGIN_VERSIONS[op]


OPS = tuple(PLUGIN_SIGNATURES)
_TRT_TYPE = {"FP32": "FLOAT", "FP16": "HALF", "BF16": "BF16", "INT32": "INT32", "INT64": "INT64", "BOOL": "BOOL"}
_REGISTERED: dict[int, list] = {}  # id(trt module) -> creators (kept alive: the registry holds raw pointers)
# Every plugin object handed to TensorRT stays referenced here for the life of the process. Measured with
# TensorRT-RTX 1.7.1: when the builder refuses a network holding Python plugins (e.g. FP8 for SM86) it releases
# them in a way that corrupts the heap (``malloc_consolidate(): invalid chunk size``) unless Python still holds
# them. Bounded: a few objects per plugin node per network or execution context.
_ALIVE: list = []


def allowed_types(trt: ModuleType, op: str) -> tuple[list[set], list[set], dict[str, list[int]]]:
    """(per input: allowed ``trt.DataType``s, per output: likewise, {type variable: its positions}) of ``op``;
    positions count inputs first, then outputs, as in ``supports_format_combination``."""
    ins, outs = PLUGIN_SIGNATURES[op]
    floats = {getattr(trt.DataType, _TRT_TYPE[t]) for t in FLOAT_TYPES_TRT}
    per_pos = [floats if t in ("F", "P") else {getattr(trt.DataType, _TRT_TYPE[t])} for t in ins + outs]
    groups: dict[str, list[int]] = {}
    for pos, t in enumerate(ins + outs):
        if t in ("F", "P"):
            groups.setdefault(t, []).append(pos)
    return per_pos[:len(ins)], per_pos[len(ins):], groups


def output_types(trt: ModuleType, op: str, input_types: list) -> list:
    """The data types of ``op``'s outputs given its input types (a type variable takes its input's type)."""
    ins, outs = PLUGIN_SIGNATURES[op]
    out = []
    for t in outs:
        if t in ("F", "P"):
            out.append(input_types[ins.index(t)])
        else:
            out.append(getattr(trt.DataType, _TRT_TYPE[t]))
    return out


def _output_shapes(trt: ModuleType, op: str, inputs: list) -> list:
    """Symbolic output shapes (``trt.DimsExprs``) from the inputs' (docs/kernels.md)."""
    if op == "paged_attention":
        return [trt.DimsExprs(inputs[0])]  # out like q
    if op == "kv_append":
        return [trt.DimsExprs(inputs[2]), trt.DimsExprs(inputs[3])]  # the pools, updated
    # num_seqs (dimension 0 of draft_lens) for the verifiers, N (rows of logits) for confidence_unmask
    source = {"draft_verify": 2, "draft_verify_sampling": 1, "confidence_unmask": 0}[op]
    rows = inputs[source][0]
    return [trt.DimsExprs([rows]), trt.DimsExprs([rows])]


def read_fields(op: str, fields: Any) -> dict[str, int | float]:
    """The op's attributes from a ``PluginFieldCollection`` (parser or deserialization); unknown fields (the
    parser also passes ``plugin_namespace`` / ``plugin_version``) are ignored. KeyError names a missing one."""
    wanted = PLUGIN_FIELDS[op]
    got = {}
    for f in fields or ():
        if f.name in wanted:
            data = f.data
            got[f.name] = wanted[f.name](data[0] if hasattr(data, "__len__") else data)
    missing = sorted(set(wanted) - set(got))
    if missing:
        raise KeyError(f"trimode::{op} plugin: missing field(s) {missing}; the ONNX node must carry them")
    return got


# ---- enqueue: TensorRT's device pointers as torch tensors, then the Triton launchers -----------------------------

class _DeviceArray:
    """A device buffer described by ``__cuda_array_interface__`` (v3), for ``torch.as_tensor``."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (int(ptr), False),
                                         "version": 3, "strides": None}


def as_torch(trt: ModuleType, ptr: int, desc: Any):
    """A torch CUDA tensor over TensorRT's buffer ``ptr`` with ``desc``'s dims and type (no copy)."""
    import torch

    shape = tuple(int(d) for d in desc.dims)
    dt = trt.DataType
    typestr, view = {dt.FLOAT: ("<f4", None), dt.HALF: ("<f2", None), dt.BF16: ("<i2", torch.bfloat16),
                     dt.INT32: ("<i4", None), dt.INT64: ("<i8", None), dt.BOOL: ("|b1", None),
                     dt.UINT8: ("|u1", None)}[desc.type]
    t = torch.as_tensor(_DeviceArray(ptr, shape, typestr), device="cuda")
    return t.view(view) if view is not None else t


def run_op(op: str, attrs: dict, ins: list, outs: list) -> None:
    """Launch ``op``'s Triton kernel on torch tensors ``ins`` into ``outs`` (on the current CUDA stream)."""
    from trimode.plugins import confidence_unmask, draft_verify, kv_append, paged_attention

    if op == "paged_attention":
        q, k_new, v_new, k_pool, v_pool, tables, lens, starts = ins
        paged_attention.paged_attention_triton(
            q, k_new, v_new, k_pool, v_pool, tables, lens, starts, bool(attrs["is_causal"]), attrs["scale"],
            attrs["page_size"], max_context_len=tables.shape[1] * k_pool.shape[1], out=outs[0])
    elif op == "kv_append":
        k_new, v_new, k_pool, v_pool, slots = ins
        k_out, v_out = outs
        for src, dst in ((k_pool, k_out), (v_pool, v_out)):
            if dst.data_ptr() != src.data_ptr():  # not aliased (an engine without in-place I/O): copy, then write
                dst.copy_(src)
        kv_append.kv_append_triton(k_new, v_new, k_out, v_out, slots)
    elif op == "draft_verify":
        accepted, bonus = draft_verify.draft_verify_greedy_triton(*ins, attrs["mask_token_id"])
        outs[0].copy_(accepted)
        outs[1].copy_(bonus)
    elif op == "draft_verify_sampling":
        accepted, bonus = draft_verify.draft_verify_sampling_triton(*ins)
        outs[0].copy_(accepted)
        outs[1].copy_(bonus)
    elif op == "confidence_unmask":
        tokens, confidence = confidence_unmask.confidence_unmask_triton(ins[0], ins[1], attrs["mask_token_id"])
        outs[0].copy_(tokens)
        outs[1].copy_(confidence)
    else:
        raise ValueError(f"unknown plugin op {op!r}; known: {', '.join(OPS)}")


# ---- the classes ----------------------------------------------------------------------------------------------

def plugin_classes(trt: ModuleType) -> dict[str, tuple[type, type]]:
    """{op: (plugin class, creator class)} built on the TensorRT module ``trt``'s interfaces."""

    class TrimodePlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuildV2, trt.IPluginV3OneRuntime):
        """One trimode op as an IPluginV3 (the op named by ``plugin_name``); see the module docstring."""

        def __init__(self, op: str, attrs: dict, phase: Any = None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuildV2.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.op, self.attrs, self.phase = op, dict(attrs), phase
            self.plugin_name, self.plugin_namespace, self.plugin_version = op, PLUGIN_NAMESPACE, plugin_version(op)
            self.num_outputs = len(PLUGIN_SIGNATURES[op][1])
            # one timing entry per op and attribute set (the ops have a single kernel path: no tactic timing)
            self.timing_cache_id = f"{op}:{sorted(self.attrs.items())}"

        # core / build
        def get_capability_interface(self, type_):
            return self

        def clone(self):
            c = TrimodePlugin(self.op, self.attrs, self.phase)
            _ALIVE.append(c)
            return c

        def get_output_data_types(self, input_types):
            return output_types(trt, self.op, list(input_types))

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return _output_shapes(trt, self.op, list(inputs))

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            ins, outs, groups = allowed_types(trt, self.op)
            if desc.type not in (ins + outs)[pos]:
                return False
            for positions in groups.values():  # a type variable: same type as its first position
                if pos in positions and positions[0] < pos and in_out[positions[0]].desc.type != desc.type:
                    return False
            return True

        def configure_plugin(self, inp, out):
            pass

        def get_workspace_size(self, inp, out):
            return 0

        def get_valid_tactics(self):
            return []  # the launchers pick their tiles from the shapes at run time

        def get_aliased_input(self, output_index):
            return PLUGIN_ALIASES.get(self.op, {}).get(int(output_index), -1)

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection(_fields(trt, self.op, self.attrs))

        # runtime
        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inp, out):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import torch

            ins = [as_torch(trt, p, d) for p, d in zip(inputs, input_desc)]
            outs = [as_torch(trt, p, d) for p, d in zip(outputs, output_desc)]
            with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
                run_op(self.op, self.attrs, ins, outs)

    classes = {}
    for op in OPS:
        class Creator(trt.IPluginCreatorV3One):
            """Creates ``trimode::<op>`` plugins from the parser's node attributes or a plan's serialized fields."""

            def __init__(self, op: str = op) -> None:
                trt.IPluginCreatorV3One.__init__(self)
                self.op = op
                self.name, self.plugin_namespace, self.plugin_version = op, PLUGIN_NAMESPACE, plugin_version(op)
                self.field_names = trt.PluginFieldCollection(_fields(trt, op, None))

            def create_plugin(self, name, fields, phase):
                c = TrimodePlugin(self.op, read_fields(self.op, fields), phase)
                _ALIVE.append(c)
                return c

        classes[op] = (TrimodePlugin, Creator)
    return classes


def _fields(trt: ModuleType, op: str, attrs: dict | None) -> list:
    """PluginFields of ``op``: with values (``attrs``) or, for the creator's field list, empty."""
    import numpy as np

    out = []
    for name, kind in PLUGIN_FIELDS[op].items():
        dtype, ftype = (np.int32, trt.PluginFieldType.INT32) if kind is int else \
            (np.float32, trt.PluginFieldType.FLOAT32)
        data = np.array([] if attrs is None else [attrs[name]], dtype=dtype)
        out.append(trt.PluginField(name, data, ftype))
    return out


def register(trt: ModuleType) -> list:
    """Register a creator per op with ``trt``'s plugin registry under namespace ``trimode`` (idempotent per
    module); returns the creators (kept alive here). Needs no GPU."""
    key = id(trt)
    if key in _REGISTERED:
        return _REGISTERED[key]
    registry = trt.get_plugin_registry()
    creators = []
    for op, (_, creator_cls) in plugin_classes(trt).items():
        creator = creator_cls()
        if not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise RuntimeError(f"TensorRT refused to register the trimode::{op} plugin creator")
        creators.append(creator)
    _REGISTERED[key] = creators
    return creators


__all__ = ["OPS", "allowed_types", "as_torch", "output_types", "plugin_classes", "read_fields",
           "register", "run_op"]

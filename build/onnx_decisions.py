"""The decision tail of the engine graphs (tensor-parallel size 1): the greedy decisions made on the device, so
that a few int32 / fp32 numbers leave it instead of [rows, V] logits (docs/kernels.md, ``runtime/passes.py``).

The runtime feeds the inputs (``runtime/executors/decisions.decision_feeds``: semantics and padding):

| input           | type / shape                  | graphs                              |
|-----------------|-------------------------------|-------------------------------------|
| `decide_index`  | int64 [Q]                     | every kind, unified                 |
| `verify_gather` | int64 [Nd * Bd]               | prefill, decode, verify, unified    |
| `draft_tokens`  | int32 [Nd, Bd - 1] (pad -1)   | prefill, decode, verify, unified    |
| `draft_lens`    | int32 [Nd]                    | prefill, decode, verify, unified    |

``dec_logits`` [Q, V] = head(norm(Gather(h, decide_index))), on the same initializers as ``logits``. Outputs:

- causal graphs: ``accepted``, ``bonus`` int32 [Nd] = ``draft_verify`` greedy over
  target = Reshape(Gather(dec_logits, verify_gather), [Nd, Bd, V]) (Nd and Bd read from the shapes of
  ``draft_lens`` / ``draft_tokens``: any may be 0, and Bd - 1 is 0 for passes without drafts);
- the draft graph: ``unmask_tokens`` int32 [Q], ``unmask_confidence`` float [Q] = ``confidence_unmask`` of every
  row of ``dec_logits``;
- the unified graph both, with ``is_masked`` = not ``is_causal`` for every row, so a causal forward's
  ``confidence_unmask`` reads nothing (tokens -1, confidence 0) and a draft forward's ``draft_verify`` gets Nd = 0.

Plugin form: ``trimode::draft_verify`` / ``trimode::confidence_unmask`` nodes (attribute ``mask_token_id``).
Reference form, standard ONNX ops with the plugins' semantics (``plugins/draft_verify.py``,
``plugins/confidence_unmask.py``): the argmax without the mask id from ``TopK`` (k = 2; ties go to the lowest
id); the accepted drafts are the first mismatch found by
``ReduceMin`` over ``Where(match, W, column)`` with a sentinel column W (= Bd - 1, so no reduction is empty);
the bonus is ``GatherElements`` of the argmaxes at that column; the confidence ``GatherElements`` of
``Softmax`` of the raw logits.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from trimode.build.plugin_ops import PLUGIN_NAMESPACE, plugin_attributes

I32, I64, FLOAT, BOOL = TensorProto.INT32, TensorProto.INT64, TensorProto.FLOAT, TensorProto.BOOL


def decision_roles(kind: str, is_causal: bool | None) -> tuple[bool, bool]:
    """(verifies, unmasks): whether a graph of ``kind`` ends in ``draft_verify`` / ``confidence_unmask``."""
    if kind == "unified":
        return True, True
    return bool(is_causal), not is_causal


def decision_io(kind: str, is_causal: bool | None) -> tuple[list, list]:
    """(inputs, outputs) value infos of the decision tail of a graph of ``kind``."""
    vi = helper.make_tensor_value_info
    verifies, unmasks = decision_roles(kind, is_causal)
    inputs, outputs = [vi("decide_index", I64, ["Q"])], []
    if verifies:
        inputs += [vi("verify_gather", I64, ["Nd_times_Bd"]), vi("draft_tokens", I32, ["Nd", "Bd_minus_1"]),
                   vi("draft_lens", I32, ["Nd"])]
        outputs += [vi("accepted", I32, ["Nd"]), vi("bonus", I32, ["Nd"])]
    if unmasks:
        outputs += [vi("unmask_tokens", I32, ["Q"]), vi("unmask_confidence", FLOAT, ["Q"])]
    return inputs, outputs


def add_decision_tail(builder, h: str) -> None:
    """Append the decision tail to ``builder`` (a ``build.onnx_graph.GraphBuilder`` after its decoder layers;
    ``h`` the final hidden states [T, hidden]): the second head over ``decide_index`` and the decision ops of
    its kind and form, writing the graph outputs of ``decision_io``."""
    g, mask_id = builder.g, builder.cfg.mask_token_id
    rows = builder.rms_norm(g.op("Gather", [h, "decide_index"]), "encoder.norm.weight")
    dec_logits = builder.linear(rows, "diffusion_head")  # [Q, V], the same initializers as the logits head
    verifies, unmasks = decision_roles(builder.kind, builder.is_causal)
    plugin = builder.form == "plugin"
    if verifies:
        (_plugin_verify if plugin else _reference_verify)(g, dec_logits, builder.vocab, mask_id)
    if unmasks:
        if plugin:
            masked = g.op("Not", ["is_causal"]) if builder.unified else g.const(True, np.bool_)
            is_masked = g.op("Expand", [masked, g.op("Shape", ["decide_index"])])  # [Q]
            g.op("confidence_unmask", [dec_logits, is_masked], n_out=2, domain=PLUGIN_NAMESPACE,
                 name="confidence_unmask", outputs=["unmask_tokens", "unmask_confidence"], mask_token_id=mask_id,
                 **plugin_attributes("confidence_unmask"))
        else:
            _reference_unmask(g, dec_logits, builder.vocab, mask_id)


def _target_logits(g, dec_logits: str, vocab: int) -> tuple[str, str]:
    """(target [Nd, Bd, V], W = Bd - 1 as int64 [1]): the verify rows of each deciding pass. No -1 in the
    reshape: Nd may be 0. (Reshape's default ``allowzero`` 0 copies dimension 0 when Nd = 0: also 0.)"""
    width = g.op("Slice", [g.op("Shape", ["draft_tokens"]), g.const([1]), g.const([2]), g.const([0])])
    shape = g.op("Concat", [g.op("Shape", ["draft_lens"]), g.op("Add", [width, g.const([1])]), g.const([vocab])],
                 axis=0)
    return g.op("Reshape", [g.op("Gather", [dec_logits, "verify_gather"]), shape]), width


def _plugin_verify(g, dec_logits: str, vocab: int, mask_id: int) -> None:
    target, _ = _target_logits(g, dec_logits, vocab)
    g.op("draft_verify", ["draft_tokens", target, "draft_lens"], n_out=2, domain=PLUGIN_NAMESPACE,
         name="draft_verify", outputs=["accepted", "bonus"], mask_token_id=mask_id,
         **plugin_attributes("draft_verify"))


def _argmax_without_mask(g, logits: str, vocab: int, mask_id: int, keepdims: int) -> str:
    """int64 argmax over the last axis with the mask id left out; ties to the lowest id. The two largest by
    ``TopK`` (equal values: the lower index first, by the ONNX spec), the second where the first is the mask id:
    one pass and no copy of the logits (a ``Where`` setting the mask id to -inf, then ``ArgMax``, took 3.4 x the
    time in onnxruntime 1.32 on [64, 4096], 1 thread)."""
    assert vocab >= 2, vocab
    top2 = g.op("TopK", [logits, g.const([2])], n_out=2, axis=-1, largest=1, sorted=1)[1]  # [..., 2]
    first = g.op("Slice", [top2, g.const([0]), g.const([1]), g.const([-1])])
    second = g.op("Slice", [top2, g.const([1]), g.const([2]), g.const([-1])])
    best = g.op("Where", [g.op("Equal", [first, g.const(mask_id)]), second, first])  # [..., 1]
    return best if keepdims else g.op("Squeeze", [best, g.const([-1])])


def _reference_verify(g, dec_logits: str, vocab: int, mask_id: int) -> None:
    target, width = _target_logits(g, dec_logits, vocab)
    best = _argmax_without_mask(g, target, vocab, mask_id, keepdims=0)  # [Nd, Bd]
    best_at_drafts = g.op("Slice", [best, g.const([0]), width, g.const([1])])  # [Nd, W]
    cols = g.op("Range", [g.const(0), g.op("Squeeze", [width, g.const([0])]), g.const(1)])  # [W]
    lens = g.op("Unsqueeze", [g.op("Cast", ["draft_lens"], to=I64), g.const([1])])  # [Nd, 1]
    in_draft = g.op("Less", [g.op("Unsqueeze", [cols, g.const([0])]), lens])  # [Nd, W]
    match = g.op("And", [g.op("Equal", [best_at_drafts, g.op("Cast", ["draft_tokens"], to=I64)]), in_draft])
    miss_col = g.op("Where", [match, width, cols])  # [Nd, W]: the column of a mismatch, W where matched
    sentinel = g.op("Expand", [width, g.op("Concat", [g.op("Shape", ["draft_lens"]), g.const([1])], axis=0)])
    num_matched = g.op("ReduceMin", [g.op("Concat", [miss_col, sentinel], axis=1), g.const([1])],
                       keepdims=1)  # [Nd, 1]: the first mismatch = the leading run of matches
    g.op("Cast", [g.op("Squeeze", [g.op("Add", [num_matched, g.const(1)]), g.const([1])])], to=I32,
         outputs=["accepted"])
    bonus = g.op("GatherElements", [best, num_matched], axis=1)  # [Nd, 1]
    g.op("Cast", [g.op("Squeeze", [bonus, g.const([1])])], to=I32, outputs=["bonus"])


def _reference_unmask(g, dec_logits: str, vocab: int, mask_id: int) -> None:
    tokens = _argmax_without_mask(g, dec_logits, vocab, mask_id, keepdims=1)  # [Q, 1]
    probs = g.op("Softmax", [dec_logits], axis=-1)  # of the raw logits, the mask id included
    confidence = g.op("GatherElements", [probs, tokens], axis=1)
    g.op("Squeeze", [confidence, g.const([1])], outputs=["unmask_confidence"])
    g.op("Cast", [g.op("Squeeze", [tokens, g.const([1])])], to=I32, outputs=["unmask_tokens"])

"""The decision inputs and outputs every executor shares (docs/kernels.md "Engines that decide"): how the passes
of one forward that ask for the engine's decision (``SeqPass.decide``) are laid out for the graphs'
``draft_verify`` / ``confidence_unmask`` tails (build/onnx_decisions.py), the torch executor's ops and the
TensorRT bindings. Imports nothing heavy."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from trimode.runtime.passes import SeqPass

# the decision outputs of the graphs (build/onnx_decisions.py): draft_verify's and confidence_unmask's
DECISION_OUTPUTS = ("accepted", "bonus", "unmask_tokens", "unmask_confidence")


def decision_feeds(passes: Sequence[SeqPass]) -> dict[str, np.ndarray]:
    """The decision inputs of a forward over ``passes`` (build/onnx_graph.py, docs/kernels.md "Engines that
    decide"), for the passes with ``decide`` set:

    - ``decide_index`` int64 [Q]: the token rows of the forward whose logits the decision ops read: a causal pass's
      last ``num_logits`` rows, a block-bidirectional pass's ``decide_rows``, in pass order;
    - ``verify_gather`` int64 [Nd * Bd]: for each deciding causal pass (Nd of them, Bd = the most rows any has),
      its rows among the Q, padded to Bd by repeating its last one: the ``draft_verify`` target [Nd, Bd, V];
    - ``draft_tokens`` int32 [Nd, Bd - 1] (its last ``num_logits - 1`` tokens, padding -1) and ``draft_lens``
      int32 [Nd].
    A graph takes the ones it has (causal graphs all four, the draft graph ``decide_index``)."""
    index, verify, drafts = [], [], []
    end = 0
    for p in passes:
        start, end = end, end + p.num_tokens
        if not p.decide:
            continue
        if p.kind.is_causal:
            verify.append(list(range(len(index), len(index) + p.num_logits)))
            drafts.append(list(p.token_ids[p.num_tokens - p.num_logits + 1:]))
            index += range(end - p.num_logits, end)
        else:
            index += [start + r for r in p.decide_rows]
    width = max([len(v) for v in verify] + [1])
    return {
        "decide_index": np.array(index, dtype=np.int64),
        "verify_gather": np.array([v[min(i, len(v) - 1)] for v in verify for i in range(width)], dtype=np.int64),
        "draft_tokens": np.array([d + [-1] * (width - 1 - len(d)) for d in drafts], dtype=np.int32).reshape(
            len(drafts), width - 1),
        "draft_lens": np.array([len(d) for d in drafts], dtype=np.int32),
    }

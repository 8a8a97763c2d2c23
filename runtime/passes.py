"""The typed contract between planning (modes, scheduler) and execution (executors): one ``SeqPass`` per
sequence per forward. Its kind fixes the attention pattern, whether its K/V is kept, and whether the
drafter LoRA is on:

| kind    | pattern              | K/V kept | LoRA |
|---------|----------------------|----------|------|
| prefill | causal               | yes      | no   |
| decode  | causal               | yes      | no   |
| verify  | causal               | yes      | no   |
| commit  | causal               | yes      | no   |
| draft   | block-bidirectional  | no       | yes (if the request asks) |
| denoise | block-bidirectional  | no       | no   |

Block-bidirectional: the pass's tokens see the whole committed prefix and all of the pass's tokens.

A greedy pass may ask the executor for the engine's **decision** instead of its logits (``SeqPass.decide``,
docs/kernels.md "Engines that decide"): a causal pass gets ``draft_verify``'s accepted length and bonus token
over its logit rows, a block-bidirectional pass ``confidence_unmask``'s token and confidence for the rows it
names; only those few numbers leave the device. ``PassOutput`` holds what an executor returns for one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class PassKind(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    VERIFY = "verify"
    COMMIT = "commit"
    DRAFT = "draft"
    DENOISE = "denoise"

    @property
    def is_causal(self) -> bool:
        return self not in (PassKind.DRAFT, PassKind.DENOISE)

    @property
    def keeps_kv(self) -> bool:
        return self.is_causal


@dataclass(frozen=True)
class SeqPass:
    """Compute ``token_ids`` of sequence ``seq_id`` at positions start_pos .. start_pos+len-1.

    ``start_pos`` equals the sequence's committed length: a pass continues the cache. The one exception is a
    fused spec step (runtime.modes.FusedSpecPolicy): besides its chain (a verify pass at the committed length)
    it holds draft passes of the same sequence at start_pos L+i+1, whose context includes chain tokens written
    earlier in the same forward (executors write kept K/V first: docs/kernels.md).
    Logits are returned for the last ``num_logits`` tokens, unless ``decide``: then the executor returns the
    engine's greedy decision (``PassOutput``) instead. A causal pass decides with ``draft_verify`` over its last
    ``num_logits`` rows, its drafts being its last ``num_logits - 1`` tokens (none for a prefill, decode or commit:
    accepted 1 and the bonus is the argmax of the last row); a block-bidirectional pass decides with
    ``confidence_unmask`` for each row of ``decide_rows`` (indices into ``token_ids``: the masked positions the
    policy will fill).
    """

    seq_id: int
    kind: PassKind
    token_ids: tuple[int, ...]
    start_pos: int
    num_logits: int = 1
    use_lora: bool = False
    decide: bool = False
    decide_rows: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        assert self.token_ids, "a pass needs at least one token"
        assert 1 <= self.num_logits <= len(self.token_ids), (self.num_logits, len(self.token_ids))
        assert not (self.use_lora and self.kind is not PassKind.DRAFT), "the drafter LoRA is for draft passes only"
        assert not self.decide_rows or (self.decide and not self.kind.is_causal), "decide_rows: deciding draft passes"
        assert all(0 <= r < len(self.token_ids) for r in self.decide_rows), self.decide_rows

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class PassOutput:
    """What an executor returns for one pass.

    - ``logits``: fp32 [num_logits, V] (the pass did not ``decide``), else None;
    - causal deciding pass: ``accepted`` (drafts matched + 1, at least 1) and ``bonus`` (the target's token after
      the last match), as ``plugins.draft_verify`` (greedy) defines them;
    - block-bidirectional deciding pass: ``tokens`` int64 [len(decide_rows)] (argmax, mask id excluded) and
      ``confidence`` fp32 [len(decide_rows)] (softmax of the raw logits at that token), as
      ``plugins.confidence_unmask`` defines them, on the CPU.
    """

    logits: torch.Tensor | None = None
    accepted: int = 0
    bonus: int = -1
    tokens: torch.Tensor | None = None
    confidence: torch.Tensor | None = None

    @property
    def num_bytes(self) -> int:
        """The bytes of this output as the executor hands it back (decisions: int32 tokens and fp32 confidences, as
        the ops return them on the device, before they are copied to the host)."""
        if self.logits is not None:
            return self.logits.numel() * self.logits.element_size()
        if self.tokens is not None:
            return self.tokens.numel() * 4 + self.confidence.numel() * 4  # int32 + fp32 per row, as the ops return
        return 8  # accepted + bonus, int32 each


def split_outputs(passes: list[SeqPass], logits: torch.Tensor | None, accepted=None, bonus=None, tokens=None,
                  confidence=None) -> list[PassOutput]:
    """One ``PassOutput`` per pass from the outputs of one forward over ``passes`` (in this order): ``logits``
    [R, V] holds the rows of the passes that do not decide (``num_logits`` each, in order); ``accepted`` / ``bonus``
    [Nd] one entry per deciding causal pass; ``tokens`` / ``confidence`` [M] the ``decide_rows`` of the deciding
    block-bidirectional passes, concatenated. Any array-like (torch or numpy) is accepted for the decisions."""
    out, row, d, m = [], 0, 0, 0
    for p in passes:
        if not p.decide:
            out.append(PassOutput(logits=logits[row:row + p.num_logits]))
            row += p.num_logits
        elif p.kind.is_causal:
            out.append(PassOutput(accepted=int(accepted[d]), bonus=int(bonus[d])))
            d += 1
        else:
            n = len(p.decide_rows)
            out.append(PassOutput(tokens=torch.as_tensor(tokens[m:m + n]).long().cpu(),
                                  confidence=torch.as_tensor(confidence[m:m + n]).float().cpu()))
            m += n
    return out

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
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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
    Logits are returned for the last ``num_logits`` tokens.
    """

    seq_id: int
    kind: PassKind
    token_ids: tuple[int, ...]
    start_pos: int
    num_logits: int = 1
    use_lora: bool = False

    def __post_init__(self) -> None:
        assert self.token_ids, "a pass needs at least one token"
        assert 1 <= self.num_logits <= len(self.token_ids), (self.num_logits, len(self.token_ids))
        assert not (self.use_lora and self.kind is not PassKind.DRAFT), "the drafter LoRA is for draft passes only"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)

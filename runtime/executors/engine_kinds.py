"""Engine kinds: the distinct forwards a tri-mode model needs, and which pass kinds and modes use them.

| kind      | tokens per sequence | attention            | K/V kept | LoRA            | serves passes     |
|-----------|---------------------|----------------------|----------|-----------------|-------------------|
| `prefill` | N                   | causal               | yes      | -               | prefill           |
| `decode`  | 1                   | causal               | yes      | -               | decode            |
| `draft`   | a block             | block-bidirectional  | no       | gated per token | draft, denoise    |
| `verify`  | a block (+1)        | causal               | yes      | -               | verify, commit    |

prefill, decode and verify compute the same graph; they are separate kinds because their shape ranges (the
TensorRT optimization profiles) differ. The drafter LoRA is a gated low-rank branch (``lora_mask`` input), so
denoise passes (LoRA off) and draft passes (LoRA on) share the draft kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from trimode.runtime.passes import PassKind


@dataclass(frozen=True)
class EngineKind:
    name: str
    is_causal: bool
    keeps_kv: bool
    has_lora: bool
    pass_kinds: tuple[PassKind, ...]


ENGINE_KINDS: dict[str, EngineKind] = {k.name: k for k in (
    EngineKind("prefill", True, True, False, (PassKind.PREFILL,)),
    EngineKind("decode", True, True, False, (PassKind.DECODE,)),
    EngineKind("draft", False, False, True, (PassKind.DRAFT, PassKind.DENOISE)),
    EngineKind("verify", True, True, False, (PassKind.VERIFY, PassKind.COMMIT)),
)}

MODE_KINDS: dict[str, tuple[str, ...]] = {
    "ar": ("prefill", "decode"),
    "diffusion": ("prefill", "draft", "verify"),
    "spec": ("prefill", "draft", "verify"),
}

PASS_TO_KIND: dict[PassKind, str] = {p: k.name for k in ENGINE_KINDS.values() for p in k.pass_kinds}


class ModeError(ValueError):
    """An unknown mode name."""


def kinds_for_modes(modes: list[str] | tuple[str, ...]) -> list[str]:
    """The engine kinds the given modes need, in ``ENGINE_KINDS`` order."""
    unknown = [m for m in modes if m not in MODE_KINDS]
    if unknown or not modes:
        raise ModeError(f"unknown mode(s) {unknown or modes}; choose from: {', '.join(MODE_KINDS)}")
    wanted = {k for m in modes for k in MODE_KINDS[m]}
    return [k for k in ENGINE_KINDS if k in wanted]


def token_range(kind: str, max_batch: int, max_seq: int, block_length: int) -> tuple[int, int, int]:
    """(min, opt, max) total new tokens of one forward of ``kind`` (a TensorRT optimization profile)."""
    if kind == "prefill":
        return 1, min(max_seq, 512), max_batch * max_seq
    if kind == "decode":
        return 1, max(1, max_batch // 2), max_batch
    return 1, block_length * max(1, max_batch // 2), max_batch * (block_length + 1)

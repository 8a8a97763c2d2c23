"""Stop strings, matched on the decoded text: the one implementation behind every front end (the Triton model's
``stop`` input today).

A stop string fires wherever its characters appear in the output text, whatever tokens spell it: " unto" as one
token, "un" + "to", or inside a longer token ("the" in " them"), as vLLM and Hugging Face ``StopStringCriteria``
match. Matching a stop string's isolated encoding against token ids instead is wrong in context (BPE spells
"unto" and " unto" with different ids), so ids are used only where they are exact: a stop string that is the
content of a special token (which decoding skips, so no text would ever show it) stops on that token's id
(``special_stop_ids``), in addition to its text.

The output ends at the first match: the text is cut right after the earliest-ending occurrence of any stop
string (the match included; among matches ending at the same character, the longest); the token that
completed it is the last token kept, and tokens after it are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class StopStringError(ValueError):
    """Invalid stop strings (empty ones, or not strings)."""


class _HasAddedTokens(Protocol):
    backend: object


def check_stop_strings(strings: Iterable[str]) -> tuple[str, ...]:
    """The stop strings as a tuple, each a non-empty ``str`` (``StopStringError`` otherwise), duplicates removed."""
    out = []
    for s in strings:
        if not isinstance(s, str):
            raise StopStringError(f"stop strings must be strings, got {type(s).__name__}")
        if not s:
            raise StopStringError("stop strings must not be empty")
        if s not in out:
            out.append(s)
    return tuple(out)


def special_stop_ids(tokenizer: _HasAddedTokens, strings: Iterable[str]) -> frozenset[int]:
    """Ids of the tokenizer's special tokens whose content is one of ``strings`` (e.g. "<|eot|>"): decoding
    skips special tokens, so these stops can only be seen by id; exact because a special token is atomic.
    ``tokenizer.backend`` is a Hugging Face ``tokenizers.Tokenizer``."""
    wanted = set(strings)
    added = tokenizer.backend.get_added_tokens_decoder()
    return frozenset(i for i, tok in added.items() if tok.special and tok.content in wanted)


class StopStringMatcher:
    """Incremental matching of stop strings on decoded text.

    ``push(text)`` appends a text increment (e.g. a ``StreamDecoder`` increment for one token) and returns True
    when a stop string now appears; ``text`` is then the output up to and including the first match
    (``match`` is the stop string), and later pushes are ignored. Each push searches only the window a new
    match can lie in (the increment plus the longest stop string's length - 1 before it): O(output) overall.
    """

    def __init__(self, strings: Iterable[str]) -> None:
        self.strings = check_stop_strings(strings)
        self.longest = max((len(s) for s in self.strings), default=0)
        self.text = ""
        self.match: str | None = None

    @property
    def is_stopped(self) -> bool:
        return self.match is not None

    def push(self, text: str) -> bool:
        """Append ``text``; True once a stop string has matched (then and on every later call)."""
        if self.match is not None:
            return True
        start = max(0, len(self.text) - self.longest + 1)
        self.text += text
        best: tuple[int, int, str] | None = None  # (end, -length, string): earliest end, then longest
        for s in self.strings:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or (i + len(s), -len(s)) < best[:2]):
                best = (i + len(s), -len(s), s)
        if best is None:
            return False
        self.text, self.match = self.text[:best[0]], best[2]
        return True

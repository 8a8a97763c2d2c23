"""Stop strings, matched on the decoded text: the one implementation behind every front end (the Python API's
``stop=``, ``trimode generate --stop``, the Triton model's ``stop`` input, the OpenAI server's ``stop``).

A stop string fires wherever its characters appear in the output text, whatever tokens spell it: " unto" as one
token, "un" + "to", or inside a longer token ("the" in " them"), as vLLM and Hugging Face ``StopStringCriteria``
match. Matching a stop string's isolated encoding against token ids instead is wrong in context (BPE spells
"unto" and " unto" with different ids), so ids are used only where they are exact: a stop string that is the
content of a special token (which decoding skips, so no text would ever show it) stops on that token's id
(``special_stop_ids``), in addition to its text.

The output ends at the first match, and the stop string itself is never emitted (OpenAI's and vLLM's default):
the text is cut right before the earliest-ending occurrence of any stop string (among matches ending at the same
character, the longest); the token that completed it is the last token id kept (the ids are what the model
generated, so prompt + ids is what its KV cache held), tokens after it are dropped, and the request ends with
finish reason "stop", freeing its pages. While streaming, text that could still turn into a stop string is held
back until it cannot (``OutputAssembler.take``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from trimode.runtime.model.tokenizer import StreamDecoder


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


def _held_back(text: str, strings: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that are a proper prefix of some stop string (so may still become one)."""
    best = 0
    for s in strings:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class OutputAssembler:
    """One request's output: token ids in, text increments out (UTF-8 safe, ``StreamDecoder``), stop strings
    applied (module docstring: the text ends before the first match; the ids end with the token that completed
    it).

    ``push(ids)`` adds generated tokens and returns False once a stop string has matched (the caller then ends
    the request; later pushes are ignored). ``take()`` returns the text and ids not handed out yet, the text
    without a tail that could still become a stop string; ``finish()`` returns everything not handed out (call
    it when the request ends). ``text`` / ``ids`` are the whole output so far, ``stop_string`` the matched stop
    string (None while none matched). ``tokenizer`` None: ids only (no text, no stop strings).
    """

    def __init__(self, tokenizer, stop_strings: Iterable[str] = ()) -> None:
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        strings = check_stop_strings(stop_strings)
        self.matcher = StopStringMatcher(strings) if strings and tokenizer is not None else None
        self.text, self.ids = "", []
        self.sent_chars = self.sent_ids = 0
        self.last_kept = 0

    @property
    def stopped(self) -> bool:
        return self.matcher is not None and self.matcher.is_stopped

    @property
    def stop_string(self) -> str | None:
        return None if self.matcher is None else self.matcher.match

    def push(self, ids: list[int]) -> bool:
        """Add generated token ids; False once a stop string has matched (the ids after it are dropped:
        ``last_kept`` says how many of this push's ids were kept)."""
        if self.stopped:
            self.last_kept = 0
            return False
        before = len(self.ids)
        try:
            return self._push(ids)
        finally:
            self.last_kept = len(self.ids) - before

    def verdict(self, ids: list[int]) -> bool | int:
        """``push`` as an engine token callback answers (runtime.request.TokenCallback): True to go on, else the
        number of these ids kept (the request ends with them)."""
        return True if self.push(ids) else self.last_kept

    def _push(self, ids: list[int]) -> bool:
        if self.decoder is None:
            self.ids.extend(ids)
            return True
        if self.matcher is None:
            self.ids.extend(ids)
            self.text += self.decoder.push(ids)
            return True
        for t in ids:  # token by token: the match ends the output at the token that completed it
            self.ids.append(t)
            if self.matcher.push(self.decoder.push([t])):
                break
        full = self.matcher.text
        self.text = full[:len(full) - len(self.matcher.match)] if self.stopped else full
        return not self.stopped

    def take(self) -> tuple[str, list[int]]:
        """The text and ids not handed out yet; text that could still become a stop string stays back."""
        end = len(self.text)
        if self.matcher is not None and not self.stopped:
            end -= _held_back(self.text, self.matcher.strings)
        return self._hand_out(max(end, self.sent_chars))

    def finish(self) -> tuple[str, list[int]]:
        """Everything not handed out yet (the request has ended: nothing can become a stop string any more)."""
        return self._hand_out(len(self.text))

    def _hand_out(self, end: int) -> tuple[str, list[int]]:
        text, ids = self.text[self.sent_chars:end], self.ids[self.sent_ids:]
        self.sent_chars, self.sent_ids = end, len(self.ids)
        return text, ids

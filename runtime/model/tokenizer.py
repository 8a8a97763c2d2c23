"""The checkpoint's tokenizer (``tokenizer.json``, Hugging Face ``tokenizers`` format) and incremental
detokenization for streaming.

Special tokens follow ``transformers`` (5.x, ``TokenizersBackend``) for the same directory: a prompt is encoded
with ``add_special_tokens=True``, i.e. through ``tokenizer.json``'s post-processor (a ``TemplateProcessing``
such as ``"<s> $A"`` adds the BOS token; none adds nothing). Like ``transformers`` when ``tokenizer.json``
exists, ``add_bos_token`` / ``add_eos_token`` in ``tokenizer_config.json`` do not override that template."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import models, pre_tokenizers


class TokenizerError(ValueError):
    """A tokenizer that cannot be used with its checkpoint."""


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, eos_token: str | None = None, mask_token: str | None = None) -> None:
        self.backend = backend
        self.eos_token, self.mask_token = eos_token, mask_token

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise TokenizerError(f"{path} has no tokenizer.json")
        try:
            backend = _HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
            raise TokenizerError(f"{file} could not be read: {e}") from None
        extra: dict = {}
        config = path / "tokenizer_config.json"
        if config.exists():
            extra = json.loads(config.read_text())
        return cls(backend, extra.get("eos_token"), extra.get("mask_token"))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.backend.save(str(path / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                  "mask_token": self.mask_token}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. ``add_special_tokens=True`` applies the post-processor's template (BOS / EOS
        as ``transformers``' ``tokenizer(text)`` adds them: use it for prompts); the default encodes the bare
        text (calibration streams, pieces of a document). Runs without the GIL (``encode_batch``
        releases it, ``encode`` does not), so a long prompt tokenized on one thread never pauses the others."""
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing list of token ids into text increments, holding back incomplete UTF-8 sequences.

    Each push decodes only a short window (the tokens since the previous increment's start), not the whole
    output, so streaming a long generation costs O(tokens) overall."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window: decoding from here gives text consistent with what was emitted
        self._read = 0    # ids before this are emitted

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        text = self.tokenizer.decode(self.ids[self._prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or an incomplete multi-byte character
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before):]


def word_level_tokenizer(vocab_size: int, special: dict[int, str]) -> Tokenizer:
    """A whitespace word-level tokenizer with tokens ``w<i>`` and the given special tokens (random test models)."""
    vocab = {special.get(i, f"w{i}"): i for i in range(vocab_size)}
    backend = _HFTokenizer(models.WordLevel(vocab, unk_token=special.get(0, "w0")))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(list(special.values()))
    mask = next((t for t in special.values() if "mask" in t), None)
    eos = next((t for t in special.values() if t in ("</s>", "<|eot|>")), None)
    return Tokenizer(backend, eos_token=eos, mask_token=mask)

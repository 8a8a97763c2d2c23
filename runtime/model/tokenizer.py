"""The checkpoint's tokenizer (``tokenizer.json``, Hugging Face ``tokenizers`` format) and incremental
detokenization for streaming.

Special tokens follow ``transformers`` (5.x, ``TokenizersBackend``) for the same directory: a prompt is encoded
with ``add_special_tokens=True``, i.e. through ``tokenizer.json``'s post-processor (a ``TemplateProcessing``
such as ``"<s> $A"`` adds the BOS token; none adds nothing). Like ``transformers`` when ``tokenizer.json``
exists, ``add_bos_token`` / ``add_eos_token`` in ``tokenizer_config.json`` do not override that template.

The chat template is read as ``transformers`` 5.x reads it: ``chat_template.jinja`` (with named ones in
``additional_chat_templates/<name>.jinja``) wins over ``chat_template`` in ``tokenizer_config.json`` (a string,
or a list of ``{"name", "template"}``); ``apply_chat_template`` renders it with ``chat_template.py``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import models, pre_tokenizers
from trimode.runtime.model.chat_template import ChatTemplateError, render_chat_template

CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR = "chat_template.jinja", "additional_chat_templates"
# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(ValueError):
    """A tokenizer that cannot be used with its checkpoint."""


class Tokenizer:
    """A ``tokenizers`` backend with the special-token strings and chat templates of its checkpoint.

    ``special_tokens`` are the strings a chat template sees (``bos_token``, ``eos_token``, ... and
    model-specific ``*_token`` entries); ``eos_token`` / ``mask_token`` are added to them. ``chat_template`` is
    the default template (None: the checkpoint has none); ``chat_templates`` holds every named one, the
    default under ``"default"`` (``"tool_use"`` is picked when tools are passed, as in ``transformers``)."""

    def __init__(self, backend: _HFTokenizer, eos_token: str | None = None, mask_token: str | None = None, *,
                 special_tokens: Mapping[str, str] | None = None, chat_template: str | None = None,
                 chat_templates: Mapping[str, str] | None = None) -> None:
        self.backend = backend
        self.eos_token, self.mask_token = eos_token, mask_token
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        for name, token in (("eos_token", eos_token), ("mask_token", mask_token)):
            if token is not None:
                self.special_tokens[name] = token
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        if chat_template is not None:
            self.chat_templates["default"] = chat_template
        self.chat_template: str | None = self.chat_templates.get("default")

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
        special = _special_tokens(extra, config)
        return cls(backend, special.get("eos_token"), special.get("mask_token"), special_tokens=special,
                   chat_templates=_chat_templates(path, extra, config))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.backend.save(str(path / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                  "mask_token": self.mask_token}
        config.update((k, v) for k, v in self.special_tokens.items() if k not in config)
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        # As transformers 5.x saves them: the default in chat_template.jinja, the others beside it
        templates = {**self.chat_templates, "default": self.chat_template}  # the attribute may have been set
        for name, template in templates.items():
            if template is None:
                continue
            file = path / CHAT_TEMPLATE_FILE if name == "default" else path / CHAT_TEMPLATE_DIR / f"{name}.jinja"
            file.parent.mkdir(exist_ok=True)
            file.write_text(template, encoding="utf-8")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """The prompt text of a conversation: what ``transformers``' ``apply_chat_template(messages,
        tokenize=False, add_generation_prompt=..., **template_kwargs)`` gives for the same directory (see
        ``chat_template.render_chat_template``). Encode the result with ``add_special_tokens=False``: the
        template already wrote the special tokens it wants.

        Raises:
            ChatTemplateError: no chat template, bad messages, or a template that fails."""
        template = self.chat_template
        if template_kwargs.get("tools") is not None and "tool_use" in self.chat_templates:
            template = self.chat_templates["tool_use"]
        if template is None:
            named = f" (only named ones: {sorted(self.chat_templates)})" if self.chat_templates else ""
            raise ChatTemplateError(f"this model's tokenizer has no chat template{named} (chat_template in "
                                    f"tokenizer_config.json or {CHAT_TEMPLATE_FILE}): pass a prompt instead of "
                                    f"messages")
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens, **template_kwargs)

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


def _special_tokens(config: dict, file: Path) -> dict[str, str]:
    """The special-token strings transformers' ``special_tokens_map`` holds for this ``tokenizer_config.json``:
    the named ones (a string, or an ``AddedToken`` dict with ``content``) and model-specific ``*_token``
    strings (also from an ``extra_special_tokens`` dict)."""
    found: dict[str, str] = {}
    for name, value in config.items():
        if name in SPECIAL_TOKEN_NAMES and isinstance(value, dict):
            if not isinstance(value.get("content"), str):
                raise TokenizerError(f"{file}: {name} is a dict without a string 'content'")
            found[name] = value["content"]
        elif isinstance(value, str) and name.endswith("_token"):
            found[name] = value
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        found.update((k, v) for k, v in extra.items() if isinstance(v, str))
    return found


def _chat_templates(path: Path, config: dict, file: Path) -> dict[str, str]:
    """Named chat templates (the default under ``"default"``) as transformers 5.x loads them: template files
    win over ``chat_template`` in ``tokenizer_config.json``."""
    templates: dict[str, str] = {}
    if (path / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (path / CHAT_TEMPLATE_DIR).is_dir():
        for extra in sorted((path / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[extra.name.removesuffix(".jinja")] = extra.read_text(encoding="utf-8")
    if templates:
        return templates
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return {} if value is None else {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerError(f"{file}: chat_template must be a string or a list of {{'name', 'template'}} dicts")


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

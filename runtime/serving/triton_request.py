"""Reading a Triton request: the inputs and ``config.pbtxt`` parameters of the trimode model, parsed and checked
so that every error names the offending input or parameter (pure: numpy arrays in, a ``GenerationRequest`` out;
no Triton needed). ``runtime.serving.triton_model`` streams the answers.

Inputs (all optional in ``config.pbtxt``; checked here so that every error names the problem):

| name | type | default | meaning |
|---|---|---|---|
| text_input | STRING [1] | – | the prompt text (or give input_ids), at most max_prompt_bytes UTF-8 bytes |
| input_ids | INT32 [-1] | – | the prompt as token ids, at most max_prompt_tokens of them |
| messages | STRING [1] | – | the prompt as a conversation: a JSON list of {"role", "content"} messages, rendered with the checkpoint's chat template (at most max_prompt_bytes UTF-8 bytes) |
| max_tokens | INT32 [1] | parameter default_max_tokens | new tokens to generate, 1 .. max_tokens_limit |
| mode | STRING [1] | parameter default_mode | ar, diffusion, spec, fused_spec or auto |
| block_length | INT32 [1] | checkpoint block_size | diffusion / spec block length, 1 .. max_block_length |
| threshold | FP32 [1] | diffusion 0.9, spec 0.0 | confidence threshold, in [0, 1] |
| use_lora | BOOL [1] | true | spec: draft with the LoRA drafter (false: the base model drafts) |
| num_subblocks | INT32 [1] | 4 | fused_spec: sub-blocks drafted per step (1 .. block_length) |
| subblock_length | INT32 [1] | block_length / 2 | fused_spec: tokens per sub-block (1 .. block_length) |
| temperature | FP32 [1] | 0 | 0 = greedy |
| top_p | FP32 [1] | 1 | nucleus filter |
| top_k | INT32 [1] | 0 | 0 = off |
| seed | INT64 [1] | random | sampling seed |
| max_thinking_tokens | INT32 [1] | – | thinking budget: the end-of-thinking token is forced after this many tokens without it |
| end_think_token_id | INT32 [1] | the model's | the end-of-thinking token (default: config.json's end_think_token_id, else the tokenizer's ``</think>``) |
| stop | STRING [-1] | – | stop strings (output ends before the first match; the match is not emitted) |
| stream | BOOL [1] | true | false: one response with the whole text |
| command | STRING [1] | – | "stats": answer with the health snapshot instead of generating; "drain TOKEN": end every request in flight with "the server is shutting down" and refuse new ones (TOKEN: the launcher's ``TRIMODE_DRAIN_TOKEN``) |

Every input is checked in every mode (a ``block_length`` 0 or a NaN ``threshold`` is refused for an AR request
too, although AR does not use them); an input that does not apply to the mode is otherwise ignored. Request
parameters (the fields of an HTTP ``generate`` body that are not inputs, e.g. a misspelled ``max_token``) are
refused by ``check_request_parameters``.

Limits (``RequestLimits``, from the model, the engine and the parameters): a prompt has at most
``max_prompt_tokens`` = min(the model's positions, the KV pool's tokens, an engine's max_seq) - 1 tokens; a ``text_input`` longer
than ``max_prompt_bytes`` (parameter; 0: ``max_prompt_tokens`` x (the longest vocabulary entry in bytes + 1))
is refused before it is decoded or tokenized, so a huge prompt costs no tokenizer time or memory;
``block_length`` is at most ``max_block_length`` (parameter; 0: an engine directory's built block length,
else the checkpoint's ``block_size``).

Errors: ``RequestError`` / ``SamplingError`` (both ``ValueError``) for a bad request, ``ValueError`` for a bad
parameter. The mode config comes from ``runtime.request.mode_config`` (the defaults above).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from trimode.runtime.request import GenerationRequest, Mode, RequestError, mode_config
from trimode.runtime.sampling import SamplingParams
from trimode.runtime.settings import TRITON_PARAMETERS
from trimode.runtime.stopping import check_stop_strings, special_stop_ids

MODES = tuple(m.value for m in Mode)
COMMANDS = ("stats", "drain")
INPUTS = ("text_input", "input_ids", "messages", "max_tokens", "mode", "block_length", "threshold", "temperature",
          "top_p", "top_k", "seed", "stop", "stream", "use_lora", "max_thinking_tokens", "end_think_token_id",
          "num_subblocks", "subblock_length", "command")

# parameter name -> (default, parser); the repository generator writes the same names. The runtime settings'
# entries (dtype, executor, num_pages, page_size, max_concurrent_requests, threads) are
# runtime.settings.TRITON_PARAMETERS'.
_SETTINGS = {name: (default, kind) for name, (default, kind, _) in TRITON_PARAMETERS.items()}
PARAMETERS = {
    "model_dir": ("", str),      # a checkpoint, or:
    "engine_dir": ("", str),     # an engine directory (scripts/build_engine.py); exactly one of the two is set
    **{name: _SETTINGS[name] for name in ("dtype", "executor", "num_pages", "page_size", "max_concurrent_requests",
                                          "threads")},
    "max_queued_requests": ("1024", int),
    "kv_admission": ("reserve", str),
    "max_tokens_limit": ("4096", int),
    "default_max_tokens": ("64", int),
    "default_mode": ("spec", str),
    "cancel_poll_ms": ("50", int),
    "tp": ("1", int),            # tensor parallelism: this model is rank 0 of `trimode serve --tp N` (mpiexec)
    "tp_master": ("", str),      # host:port where rank 0 (this model) forms the group with the worker ranks
    "tp_timeout": ("600", float),
    "max_block_length": ("0", int),   # 0: the engine's / checkpoint's block length
    "max_prompt_bytes": ("0", int),   # 0: max_prompt_tokens x (longest vocabulary entry in bytes + 1)
}


def parse_parameters(raw: dict[str, str]) -> dict:
    """The model's ``config.pbtxt`` parameters (name -> string) parsed, defaults filled in (keys: ``PARAMETERS``).
    Raises ``ValueError`` naming a parameter that does not parse or is unknown."""
    out = {}
    for name, (default, kind) in PARAMETERS.items():
        text = raw.get(name, default)
        try:
            out[name] = kind(text)
        except ValueError:
            raise ValueError(f"config.pbtxt parameter {name} must be {kind.__name__}, got {text!r}") from None
    unknown = sorted(set(raw) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"unknown config.pbtxt parameters {unknown}; known: {sorted(PARAMETERS)}")
    return out


# ---- limits -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RequestLimits:
    """The bounds a request is checked against (tokens, bytes, tokens): see the module docstring."""

    max_prompt_tokens: int
    max_prompt_bytes: int
    max_block_length: int


def _longest_token_bytes(tokenizer) -> int:
    try:
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        return max(len(token.encode("utf-8")) for token in vocab)
    except Exception:  # no vocabulary to read: a generous bound
        return 64


def request_limits(lm, params: dict) -> RequestLimits:
    """The ``RequestLimits`` of a runtime ``lm`` (a ``TriModeLM``) under the parsed ``params``; raises
    ``ValueError`` for a negative ``max_block_length`` / ``max_prompt_bytes`` parameter."""
    for name in ("max_block_length", "max_prompt_bytes"):
        if params[name] < 0:
            raise ValueError(f"config.pbtxt parameter {name} must be >= 0 (0: automatic), got {params[name]}")
    max_prompt = lm.engine.max_sequence_tokens - 1  # room for at least one new token
    max_bytes = params["max_prompt_bytes"]
    if not max_bytes:
        per_token = _longest_token_bytes(lm.tokenizer) if lm.tokenizer is not None else 64
        max_bytes = max_prompt * (per_token + 1)
    block = params["max_block_length"]
    if not block:  # the engine directory's block length, else the checkpoint's block_size
        block = lm.default_block_length
    return RequestLimits(max(1, max_prompt), max_bytes, block)


def check_request_parameters(parameters: dict) -> None:
    """Refuse request parameters: this model reads only inputs, so a parameter is a misspelled or unknown field
    (Triton's HTTP ``generate`` endpoint turns every body field that is not an input into one). Raises
    ``RequestError`` naming them and the known inputs."""
    if parameters:
        raise RequestError(f"unknown fields {sorted(parameters)}; known inputs: {list(INPUTS)}")


# ---- request parsing (pure: numpy arrays in, a GenerationRequest out) -------------------------------------

@dataclass
class ParsedRequest:
    """A checked request: the engine ``request`` (None for a command), its mode name, whether to stream, the
    stop strings matched on the decoded text (those naming a special token also by id, in
    ``request.stop_token_ids``), and the
    ``command`` ("stats" or "drain") and its ``argument`` if it is one."""

    request: GenerationRequest | None
    mode: str
    stream: bool
    stop_strings: tuple[str, ...]
    command: str | None = None
    argument: str = ""                 # the rest of the command text (the token of "drain")


def _scalar(inputs: dict, name: str, kind: str):
    arr = inputs.get(name)
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.size != 1:
        raise RequestError(f"{name} must hold exactly one value, got shape {list(arr.shape)}")
    value = arr.reshape(-1)[0]
    if kind == "str":
        return _text(value, name)
    if kind == "int":
        if not np.issubdtype(arr.dtype, np.integer):
            raise RequestError(f"{name} must be an integer tensor, got dtype {arr.dtype}")
        return int(value)
    if kind == "float":
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise RequestError(f"{name} must be a number tensor, got dtype {arr.dtype}")
        return float(value)
    if kind == "bool":
        if arr.dtype != np.bool_:
            raise RequestError(f"{name} must be a BOOL tensor, got dtype {arr.dtype}")
        return bool(value)
    raise AssertionError(kind)


def _text(value, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"{name} is not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise RequestError(f"{name} must be a STRING (BYTES) tensor, got {type(value).__name__}")


def _text_bytes(inputs: dict, name: str, limit: int) -> None:
    """Refuse a STRING input longer than ``limit`` bytes before it is decoded or tokenized."""
    arr = np.asarray(inputs[name])
    if arr.size == 1:
        value = arr.reshape(-1)[0]
        size = len(value) if isinstance(value, (bytes, np.bytes_)) else len(str(value).encode("utf-8"))
        if size > limit:
            raise RequestError(f"{name} is {size} bytes; this server takes prompts of at most {limit} bytes "
                               f"(parameter max_prompt_bytes, by default from the model's positions, the KV page "
                               f"budget and the vocabulary)")


def _conversation_ids(text: str, lm) -> tuple[int, ...]:
    """The ``messages`` input: a JSON list of messages, rendered with the checkpoint's chat template."""
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"messages is not valid JSON: {e}") from None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RequestError("messages must be a JSON list of {\"role\", \"content\"} objects")
    if lm.tokenizer is None:
        raise RequestError("this model has no tokenizer: messages need one (and its chat template)")
    try:
        ids = lm.apply_chat_template(messages)
    except ValueError as e:  # ChatTemplateError: no template, malformed messages, the template's own refusal
        raise RequestError(f"messages: {e}") from None
    if not ids:
        raise RequestError("messages render to no tokens: the prompt needs at least one token")
    return ids


def parse_request(inputs: dict, lm, params: dict, limits: RequestLimits | None = None) -> ParsedRequest:
    """Turn a request's input tensors into a validated ``GenerationRequest``; ``RequestError``/``SamplingError``
    (both ``ValueError``) name the offending input otherwise. ``limits``: ``request_limits(lm, params)``
    (computed here when None)."""
    limits = limits or request_limits(lm, params)
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise RequestError(f"unknown inputs {unknown}; known: {list(INPUTS)}")
    command = _scalar(inputs, "command", "str")
    if command is not None:
        name, _, argument = command.strip().partition(" ")
        if name not in COMMANDS:
            raise RequestError(f"unknown command {command[:40]!r}: the commands are {', '.join(COMMANDS)}")
        return ParsedRequest(None, "", False, (), name, argument.strip())

    given = [name for name in ("text_input", "input_ids", "messages") if inputs.get(name) is not None]
    if not given:
        raise RequestError("missing input: one of text_input, input_ids or messages is required")
    if len(given) > 1:
        raise RequestError(f"give one of text_input, input_ids or messages, not {' and '.join(given)}")
    text, ids = inputs.get("text_input"), inputs.get("input_ids")
    if given == ["messages"]:
        _text_bytes(inputs, "messages", limits.max_prompt_bytes)
        prompt_ids = _conversation_ids(_scalar(inputs, "messages", "str"), lm)
    elif text is not None:
        _text_bytes(inputs, "text_input", limits.max_prompt_bytes)
        prompt = _scalar(inputs, "text_input", "str")
        if not prompt.strip():
            raise RequestError("text_input is empty: the prompt needs at least one token")
        if lm.tokenizer is None:
            raise RequestError("this model has no tokenizer: send input_ids instead of text_input")
        prompt_ids = lm.encode(prompt)
        if not prompt_ids:
            raise RequestError("text_input encodes to no tokens: the prompt needs at least one token")
    else:
        arr = np.asarray(ids)
        if not np.issubdtype(arr.dtype, np.integer):
            raise RequestError(f"input_ids must be an integer tensor, got dtype {arr.dtype}")
        if arr.size == 0:
            raise RequestError("input_ids is empty: the prompt needs at least one token")
        if arr.size > limits.max_prompt_tokens:
            raise RequestError(f"input_ids has {arr.size} tokens; this server takes prompts of at most "
                               f"{limits.max_prompt_tokens} tokens")
        prompt_ids = lm.encode(arr.reshape(-1).tolist())
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise RequestError(f"the prompt is {len(prompt_ids)} tokens; this server takes prompts of at most "
                           f"{limits.max_prompt_tokens} tokens (the model's positions and the KV page budget)")

    max_tokens = _scalar(inputs, "max_tokens", "int")
    if max_tokens is None:
        max_tokens = params["default_max_tokens"]
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be an integer >= 1, got {max_tokens}")
    if max_tokens > params["max_tokens_limit"]:
        raise RequestError(f"max_tokens {max_tokens} exceeds this server's limit of {params['max_tokens_limit']} "
                           f"(parameter max_tokens_limit)")

    mode = _scalar(inputs, "mode", "str")
    mode = params["default_mode"] if mode is None else mode
    if mode not in MODES:
        raise RequestError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    block = _scalar(inputs, "block_length", "int")
    threshold = _scalar(inputs, "threshold", "float")
    use_lora = _scalar(inputs, "use_lora", "bool")
    # the same checks in every mode, also where the mode does not use the value
    if block is not None and not 1 <= block <= limits.max_block_length:
        raise RequestError(f"block_length must be an integer in 1 .. {limits.max_block_length} (this server's "
                           f"max_block_length), got {block}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:  # NaN fails both comparisons
        raise RequestError(f"threshold must be in [0, 1], got {threshold!r}")
    # block None: the API's default (engine directory's, else the checkpoint's); threshold None: diffusion 0.9, spec 0
    mode_cfg = mode_config(mode, min(lm.default_block_length, limits.max_block_length), block, threshold,
                           use_lora=True if use_lora is None else use_lora,
                           num_subblocks=_scalar(inputs, "num_subblocks", "int"),
                           subblock_length=_scalar(inputs, "subblock_length", "int"))

    temperature = _scalar(inputs, "temperature", "float")
    top_p = _scalar(inputs, "top_p", "float")
    top_k = _scalar(inputs, "top_k", "int")
    seed = _scalar(inputs, "seed", "int")
    sampling = SamplingParams(0.0 if temperature is None else temperature, 0 if top_k is None else top_k,
                              1.0 if top_p is None else top_p, seed)

    stop_strings: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    if inputs.get("stop") is not None:
        # matched on the decoded text (runtime.stopping); by id only where exact: special tokens' contents
        stop_strings = tuple(_text(value, "stop") for value in np.asarray(inputs["stop"]).reshape(-1))
        if any(not s for s in stop_strings):
            raise RequestError("stop strings must not be empty")
        if lm.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this model has none")
        stop_ids = special_stop_ids(lm.tokenizer, stop_strings)
    stream = _scalar(inputs, "stream", "bool")
    budget = _scalar(inputs, "max_thinking_tokens", "int")
    end_think = _scalar(inputs, "end_think_token_id", "int")
    if end_think is None:
        end_think = lm.end_think_token_id
    elif not 0 <= end_think < lm.config.vocab_size:
        raise RequestError(f"end_think_token_id {end_think} is outside the vocabulary (size {lm.config.vocab_size})")
    request = GenerationRequest(tuple(prompt_ids), max_tokens, mode_cfg, sampling,
                                frozenset(lm.config.eos_token_ids) | frozenset(stop_ids),
                                max_thinking_tokens=budget, end_think_token_id=end_think if budget is not None else None,
                                stop=check_stop_strings(stop_strings))
    return ParsedRequest(request, mode, True if stream is None else stream, check_stop_strings(stop_strings))

"""Reading a Triton request: the inputs and ``config.pbtxt`` parameters of the trimode model, parsed and checked
so that every error names the offending input or parameter (pure: numpy arrays in, a ``GenerationRequest`` out;
no Triton needed). ``runtime.serving.triton_model`` streams the answers.

Inputs (all optional in ``config.pbtxt``; checked here so that every error names the problem):

| name | type | default | meaning |
|---|---|---|---|
| text_input | STRING [1] | – | the prompt text (or give input_ids) |
| input_ids | INT32 [-1] | – | the prompt as token ids |
| max_tokens | INT32 [1] | parameter default_max_tokens | new tokens to generate, 1 .. max_tokens_limit |
| mode | STRING [1] | parameter default_mode | ar, diffusion or spec |
| block_length | INT32 [1] | checkpoint block_size | diffusion / spec block length |
| threshold | FP32 [1] | diffusion 0.9, spec 0.0 | confidence threshold |
| temperature | FP32 [1] | 0 | 0 = greedy |
| top_p | FP32 [1] | 1 | nucleus filter |
| top_k | INT32 [1] | 0 | 0 = off |
| seed | INT64 [1] | random | sampling seed |
| stop | STRING [-1] | – | stop strings (output ends after the first match, the match included) |
| stream | BOOL [1] | true | false: one response with the whole text |
| command | STRING [1] | – | "stats": answer with the health snapshot instead of generating |

Errors: ``RequestError`` / ``SamplingError`` (both ``ValueError``) for a bad request, ``ValueError`` for a bad
parameter. The mode config comes from ``runtime.request.mode_config`` (the defaults above).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from trimode.runtime.request import GenerationRequest, Mode, RequestError, mode_config
from trimode.runtime.sampling import SamplingParams
from trimode.runtime.settings import TRITON_PARAMETERS

MODES = tuple(m.value for m in Mode)
INPUTS = ("text_input", "input_ids", "max_tokens", "mode", "block_length", "threshold", "temperature", "top_p",
          "top_k", "seed", "stop", "stream", "command")

# parameter name -> (default, parser); the repository generator writes the same names. The runtime settings'
# entries (dtype, executor, num_pages, page_size, max_concurrent_requests) are runtime.settings.TRITON_PARAMETERS'.
_SETTINGS = {name: (default, kind) for name, (default, kind, _) in TRITON_PARAMETERS.items()}
PARAMETERS = {
    "model_dir": ("", str),
    **{name: _SETTINGS[name] for name in ("dtype", "executor", "num_pages", "page_size", "max_concurrent_requests")},
    "max_queued_requests": ("1024", int),
    "kv_admission": ("reserve", str),
    "max_tokens_limit": ("4096", int),
    "default_max_tokens": ("64", int),
    "default_mode": ("spec", str),
    "torch_threads": ("0", int),
    "cancel_poll_ms": ("50", int),
    "tp": ("1", int),            # tensor parallelism: this model is rank 0 of `trimode serve --tp N` (mpiexec)
    "tp_master": ("", str),      # host:port where rank 0 (this model) forms the group with the worker ranks
    "tp_timeout": ("600", float),
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


# ---- request parsing (pure: numpy arrays in, a GenerationRequest out) -------------------------------------

@dataclass
class ParsedRequest:
    """A checked request: the engine ``request`` (None for a command), its mode name, whether to stream, the
    stop strings matched on the decoded text (single-token stops are in ``request.stop_token_ids``), and the
    ``command`` ("stats") if it is one."""

    request: GenerationRequest | None
    mode: str
    stream: bool
    stop_strings: tuple[str, ...]
    command: str | None = None


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


def parse_request(inputs: dict, lm, params: dict) -> ParsedRequest:
    """Turn a request's input tensors into a validated ``GenerationRequest``; ``RequestError``/``SamplingError``
    (both ``ValueError``) name the offending input otherwise."""
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise RequestError(f"unknown inputs {unknown}; known: {list(INPUTS)}")
    command = _scalar(inputs, "command", "str")
    if command is not None:
        if command != "stats":
            raise RequestError(f"unknown command {command!r}: the only command is 'stats'")
        return ParsedRequest(None, "", False, (), command)

    text, ids = inputs.get("text_input"), inputs.get("input_ids")
    if text is None and ids is None:
        raise RequestError("missing input: one of text_input or input_ids is required")
    if text is not None and ids is not None:
        raise RequestError("give either text_input or input_ids, not both")
    if text is not None:
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
        prompt_ids = lm.encode(arr.reshape(-1).tolist())

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
    # block None: the checkpoint's block_size; threshold None: diffusion 0.9, spec 0.0
    mode_cfg = mode_config(mode, lm.config.block_size, block, threshold)

    temperature = _scalar(inputs, "temperature", "float")
    top_p = _scalar(inputs, "top_p", "float")
    top_k = _scalar(inputs, "top_k", "int")
    seed = _scalar(inputs, "seed", "int")
    sampling = SamplingParams(0.0 if temperature is None else temperature, 0 if top_k is None else top_k,
                              1.0 if top_p is None else top_p, seed)

    stop_strings: list[str] = []
    stop_ids: set[int] = set()
    if inputs.get("stop") is not None:
        for value in np.asarray(inputs["stop"]).reshape(-1):
            s = _text(value, "stop")
            if not s:
                raise RequestError("stop strings must not be empty")
            if lm.tokenizer is None:
                raise RequestError("stop strings need a tokenizer; this model has none")
            ids_ = lm.tokenizer.encode(s)
            if len(ids_) == 1 and lm.tokenizer.decode(ids_) == s:
                stop_ids.add(ids_[0])           # a single token: the engine stops on it exactly
            else:
                stop_strings.append(s)          # matched on the decoded text
    stream = _scalar(inputs, "stream", "bool")
    request = GenerationRequest(tuple(prompt_ids), max_tokens, mode_cfg, sampling,
                                frozenset(lm.config.eos_token_ids) | frozenset(stop_ids))
    return ParsedRequest(request, mode, True if stream is None else stream, tuple(stop_strings))

"""The public Python API: ``TriModeLM`` owns one model, one KV cache and one engine, and offers the
reference code's entry points (``ar_generate``, ``generate``, ``linear_spec_generate``) and
``fused_spec_generate`` for batches of prompts of any lengths (text, token ids or chat conversations; stop
strings and the thinking budget in every mode), plus ``run`` for requests that mix modes (``auto`` too) or
switch mode mid-way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch

from trimode.runtime import assembly
from trimode.runtime.assembly import ExecutorFactory, Runtime
from trimode.runtime.model.network import NLDModel
from trimode.runtime.model.tokenizer import Tokenizer
from trimode.runtime.parallel.comm import TPComm
from trimode.runtime.parallel.step import TensorParallelWorker
from trimode.runtime.request import (GenerationRequest, GenerationResult, ModeConfig, Mode, RequestError, TokenCallback,
                                     mode_config)
from trimode.runtime.sampling import SamplingParams
from trimode.runtime.settings import DEFAULTS, RuntimeSettings
from trimode.runtime.stopping import OutputAssembler, check_stop_strings, special_stop_ids


def _is_conversation(prompt) -> bool:
    """A list of message dicts (a chat), as opposed to text or token ids."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(m, dict) for m in prompt)


class TriModeLM:
    """One model, one KV cache, one decoding loop (runtime.assembly.Runtime) behind the reference code's entry
    points. Construct it with ``from_pretrained`` (a checkpoint), ``from_engine`` (an engine directory) or
    directly over an ``NLDModel``; under tensor parallelism (``comm=``) rank 0 gets a ``TriModeLM`` and the
    other ranks a ``TensorParallelWorker``.

    Attributes: ``model``, ``tokenizer`` (None: token ids only), ``config`` (ModelConfig), ``cache``
    (PagedKVCache), ``executor``, ``engine`` (the loop), ``engine_manifest`` (the checked manifest of an engine
    directory, else None), ``settings`` (RuntimeSettings), ``default_block_length`` (an engine directory's block
    length, else the config's ``block_size``).
    """

    def __init__(self, model: NLDModel, tokenizer: Tokenizer | None = None, num_pages: int | None = None,
                 page_size: int | None = None, max_batch_size: int | None = None,
                 executor: str | ExecutorFactory | None = None, settings: RuntimeSettings = DEFAULTS) -> None:
        """A runtime over ``model``. ``num_pages`` / ``page_size`` / ``max_batch_size`` / ``executor`` override
        ``settings`` (runtime.settings: 512 pages of 16 tokens, batch 64, the torch executor); ``executor`` may
        also be a factory called as ``executor(model, cache)``. Raises ``SettingsError`` for values out of range,
        ``ValueError`` for an unknown executor name."""
        settings = settings.with_(num_pages=num_pages, page_size=page_size, max_batch_size=max_batch_size,
                                  executor=executor if isinstance(executor, str) else None)
        self._attach(assembly.build_runtime(model, tokenizer, settings, executor))

    def _attach(self, rt: Runtime) -> None:
        self.runtime, self.settings = rt, rt.settings
        self.model, self.tokenizer, self.config = rt.model, rt.tokenizer, rt.model.config
        self.cache, self.executor, self.engine, self.engine_manifest = rt.cache, rt.executor, rt.engine, \
            rt.engine_manifest
        limits = rt.engine.limits
        # the block length requests get by default: the engines' (their profiles are tuned for it), else the model's
        self.default_block_length = limits.block_length if limits is not None else self.config.block_size

    def set_batch_invariant(self, enabled: bool = True) -> "TriModeLM":
        """Batch-invariant execution on or off (runtime.model.network): each token's forward is computed alone,
        so its logits do not depend on what shares the pass, and greedy ``linear_spec_generate`` equals
        ``ar_generate`` token for token in every dtype (bf16 included). Several times slower; torch executor
        only (``ValueError`` otherwise). Returns self."""
        if enabled and self.settings.executor != "torch":
            raise ValueError(f"batch-invariant execution needs the torch executor, not {self.settings.executor!r}")
        if enabled and getattr(self.executor, "comm", None) is not None:  # rank 0 of a tensor-parallel group
            raise ValueError("batch-invariant execution is not available under tensor parallelism (the worker "
                             "ranks compute their shards as they are)")
        self.model.batch_invariant = bool(enabled)
        return self

    @classmethod
    def from_runtime(cls, rt: Runtime) -> "TriModeLM":
        """Wrap an assembled ``Runtime`` (runtime.assembly)."""
        lm = cls.__new__(cls)
        lm._attach(rt)
        return lm

    @classmethod
    def _wrap(cls, loaded: Runtime | TensorParallelWorker) -> "TriModeLM | TensorParallelWorker":
        return cls.from_runtime(loaded) if isinstance(loaded, Runtime) else loaded

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype | None = None, device: str = "cpu",
                        comm: TPComm | None = None, settings: RuntimeSettings = DEFAULTS,
                        **overrides) -> "TriModeLM | TensorParallelWorker":
        """The runtime of checkpoint ``path`` (config.json + safetensors + tokenizer + LoRA; plain or
        ModelOpt-quantized). ``overrides`` (num_pages, page_size, max_batch_size, executor, kernels) change
        ``settings``. With ``comm`` (runtime.parallel.comm.init_tensor_parallel) each rank loads its shard:
        rank 0 gets the ``TriModeLM`` (call ``lm.executor.close()`` at the end), the other ranks a
        ``TensorParallelWorker`` (call ``serve()``). Raises ``CheckpointError`` naming what is wrong."""
        settings = settings.with_(**overrides)
        if comm is not None:
            return cls._wrap(assembly.from_checkpoint_tensor_parallel(path, comm, settings, dtype))
        return cls.from_runtime(assembly.from_checkpoint(path, settings, dtype, device))

    @classmethod
    def from_engine(cls, path: str | Path, executor: str = "auto", comm: TPComm | None = None,
                    settings: RuntimeSettings = DEFAULTS, page_size: int | None = None, num_pages: int | None = None,
                    max_batch_size: int | None = None, **executor_kwargs) -> "TriModeLM | TensorParallelWorker":
        """A runtime over an engine directory (scripts/build_engine.py); the manifest is checked first
        (``EngineDirError`` / ``EngineMismatch`` name what does not match). ``executor``: "auto" (TensorRT where
        its plans can run here, else onnxruntime: ``assembly.engine_executor``), "tensorrt" (the plans, CUDA),
        "onnxruntime" (the reference graphs) or "torch" (the engine's checkpoint). The engines' build-time limits size the runtime and admit
        requests (manifest ``shapes``: pages, batch, sequence length, tokens per forward of each engine kind;
        ``num_pages`` / ``max_batch_size`` default to them and may not exceed them; requests default to its
        block length); a request beyond them waits or is refused with a ``RequestError`` naming the limit.
        With ``comm``, this rank's graph set of a ``--tp`` build (onnxruntime only): rank 0 gets the
        ``TriModeLM``, the others a ``TensorParallelWorker``. ``executor_kwargs`` go to the executor (e.g.
        ``threads``)."""
        settings = settings.with_(num_pages=num_pages, max_batch_size=max_batch_size)
        if comm is not None:
            if executor not in ("auto", "onnxruntime"):
                raise ValueError(f"a tensor-parallel engine directory runs each rank's graphs with the onnxruntime "
                                 f"executor, not {executor!r}")
            loaded = assembly.from_engine_dir_tensor_parallel(path, comm, settings, page_size, **executor_kwargs)
            return cls._wrap(loaded)
        return cls.from_runtime(assembly.from_engine_dir(path, executor, settings, page_size, **executor_kwargs))

    # ---- prompts and requests -------------------------------------------------------------------------

    @property
    def end_think_token_id(self) -> int | None:
        """The end-of-thinking token the thinking budget forces: ``end_think_token_id`` in config.json if set,
        else the tokenizer's ``</think>`` token, else None (then a budget needs an explicit id)."""
        configured = self.config.extra.get("end_think_token_id")
        if isinstance(configured, int) and not isinstance(configured, bool):
            return configured
        return None if self.tokenizer is None else self.tokenizer.token_to_id("</think>")

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            **template_kwargs) -> tuple[int, ...]:
        """Token ids of a conversation rendered with the checkpoint's chat template (runtime.model.chat_template:
        as ``transformers``' ``apply_chat_template(..., tokenize=True)``, the rendered text encoded without
        adding special tokens: the template writes them). ``template_kwargs`` reach the template (e.g.
        ``enable_thinking``). Raises ``RequestError`` without a tokenizer, ``ChatTemplateError`` (a
        ``ValueError``) without a template or for malformed messages."""
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer: messages need one (and its chat template)")
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                  **template_kwargs)
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))

    def encode(self, prompt: str | Sequence[int] | Sequence[dict]) -> tuple[int, ...]:
        """Token ids of a prompt: text (encoded with the tokenizer's special tokens, e.g. BOS), token ids
        (checked against the vocabulary), or a conversation, a list of message dicts (``apply_chat_template``).
        Raises ``RequestError`` naming what is wrong."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this checkpoint has no tokenizer: pass token ids instead of text")
            return tuple(self.tokenizer.encode(prompt, add_special_tokens=True))  # BOS as the tokenizer adds it
        if _is_conversation(prompt):
            return self.apply_chat_template(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, int) or (hasattr(t, "__index__") and not isinstance(t, (bool, float)))
                for t in prompt):
            raise RequestError(f"a prompt is text, a list of token ids, or a conversation (a list of message "
                               f"dicts); got {type(prompt).__name__}"
                               + (" mixing other items" if isinstance(prompt, (list, tuple)) else ""))
        ids = tuple(int(t) for t in prompt)
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary (size {self.config.vocab_size})")
        return ids

    def request(self, prompt: str | Sequence[int] | Sequence[dict], max_new_tokens: int, mode: ModeConfig,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                eos_token_ids: Iterable[int] | None = None, stop_token_ids: Iterable[int] = (),
                switches: Sequence[tuple[int, ModeConfig]] = (), stop: str | Iterable[str] = (),
                max_thinking_tokens: int | None = None, end_think_token_id: int | None = None) -> GenerationRequest:
        """One request. ``prompt``: text, token ids or a conversation (``encode``). ``eos_token_ids`` (default:
        the config's) and ``stop_token_ids`` end the output after that token (included); ``stop``: stop strings,
        matched on the decoded text and never emitted (runtime.stopping; a stop string that is a special
        token's content also stops on its id). ``max_thinking_tokens``: the thinking budget
        (``SequenceState.forced_token``); ``end_think_token_id`` defaults to ``self.end_think_token_id``.
        Raises ``RequestError`` / ``SamplingError`` / ``StopStringError`` / ``ChatTemplateError`` (all
        ``ValueError``) naming the bad argument."""
        eos = self.config.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
        if not isinstance(stop, (str, list, tuple)):
            raise RequestError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        stop = check_stop_strings([stop] if isinstance(stop, str) else stop)
        if stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer (they are matched on the decoded text)")
        stop_ids = special_stop_ids(self.tokenizer, stop) if stop else frozenset()
        end_think = self.end_think_token_id if end_think_token_id is None else end_think_token_id
        if max_thinking_tokens is not None and end_think is not None and not 0 <= end_think < self.config.vocab_size:
            raise RequestError(f"end_think_token_id {end_think} is outside the vocabulary "
                               f"(size {self.config.vocab_size})")
        return GenerationRequest(self.encode(prompt), max_new_tokens, mode,
                                 SamplingParams(temperature, top_k, top_p, seed),
                                 frozenset(eos) | frozenset(stop_token_ids) | stop_ids, tuple(switches),
                                 max_thinking_tokens, end_think if max_thinking_tokens is not None else None, stop)

    def run(self, requests: Sequence[GenerationRequest], on_tokens: TokenCallback | None = None,
            raise_on_error: bool = True) -> list[GenerationResult]:
        """Run requests together (continuous batching); mixed modes share forwards. ``on_tokens(request_id,
        ids)`` sees each request's tokens as they are accepted (up to the token that completes a stop string).
        A request with stop strings ends at the first match: its result's ``text`` ends before the match and its
        ``token_ids`` with the token that completed it (finish reason "stop"). Raises the first failed
        request's exception unless ``raise_on_error`` is False (then each result carries its own ``error``)."""
        requests = list(requests)
        outputs = [OutputAssembler(self.tokenizer, r.stop) if r.stop else None for r in requests]

        def callback(out: OutputAssembler | None) -> TokenCallback | None:
            if out is None:
                return on_tokens

            def route(request_id: int, ids: list[int]) -> bool | int:
                before = len(out.ids)
                keep_going = out.push(ids)
                kept = len(out.ids) - before
                verdict = on_tokens(request_id, out.ids[before:]) if on_tokens is not None and kept else None
                if not keep_going:
                    return kept  # the stop string ended the output at the kept tokens
                return verdict  # the caller's own verdict (False / k: stop)
            return route

        results = self.engine.run(requests, [callback(out) for out in outputs])
        for r, out in zip(results, outputs):
            if out is not None and out.stopped:  # the engine kept the ids up to the match; the text ends before it
                r.text = out.text
            elif self.tokenizer is not None:
                r.text = self.tokenizer.decode(r.token_ids)
        failed = [r for r in results if r.exception is not None]
        if raise_on_error and failed:
            raise failed[0].exception
        return results

    def _batch(self, prompts, mode: ModeConfig, max_new_tokens: int, messages=None, **kw) -> list[GenerationResult]:
        """Prompts: one or a list of (text | token ids | conversation); ``messages``: one conversation or a list
        of them, instead of prompts. ``kw``: ``request``'s options (sampling, eos, stop, thinking budget)."""
        if messages is not None:
            if prompts is not None:
                raise RequestError("pass prompts or messages, not both")
            if not (isinstance(messages, (list, tuple)) and messages and
                    (_is_conversation(messages) or all(_is_conversation(m) for m in messages))):
                raise RequestError("messages must be a conversation (a list of {'role', 'content'} dicts) or a list "
                                   "of conversations")
            prompts = messages
        if prompts is None:
            raise RequestError("no prompt: pass prompts (text, token ids) or messages (a conversation)")
        if isinstance(prompts, str) or _is_conversation(prompts) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self.run([self.request(p, max_new_tokens, mode, **kw) for p in prompts])

    # ---- the reference code's entry points --------------------------------------------------------------

    def ar_generate(self, prompts=None, max_new_tokens: int = 128, **kw) -> list[GenerationResult]:
        """Autoregressive decoding: one token per forward.

        The entry points take one prompt or a list (text, token ids, or a conversation: a list of
        ``{"role", "content"}`` dicts rendered with the checkpoint's chat template), or ``messages=`` (one
        conversation or a list), and ``request``'s options: ``temperature``, ``top_k``, ``top_p``, ``seed``,
        ``eos_token_ids``, ``stop_token_ids``, ``stop`` (stop strings, never emitted), ``max_thinking_tokens``
        and ``end_think_token_id`` (the thinking budget, in every mode). One result per prompt, in order."""
        return self._batch(prompts, mode_config(Mode.AR, self.default_block_length), max_new_tokens, **kw)

    def generate(self, prompts=None, max_new_tokens: int = 128, block_length: int | None = None, policy: str = "threshold",
                 threshold: float | None = None, max_steps: int | None = None, causal_context: bool = True,
                 **kw) -> list[GenerationResult]:
        """Block diffusion: denoise blocks of ``block_length`` (default: ``default_block_length``).
        ``threshold`` (policy 'threshold' only) defaults to 0.9, the model card's setting."""
        mode = mode_config(Mode.DIFFUSION, self.default_block_length, block_length, threshold, policy, max_steps,
                           causal_context=causal_context)
        return self._batch(prompts, mode, max_new_tokens, **kw)

    def fused_spec_generate(self, prompts=None, max_new_tokens: int = 128, block_length: int | None = None,
                            num_subblocks: int | None = None, subblock_length: int | None = None,
                            use_lora: bool = True, **kw) -> list[GenerationResult]:
        """Fused self-speculation (``FusedSpecConfig``: one forward verifies the drafts and drafts the next block in
        ``num_subblocks`` sub-blocks of ``subblock_length``; defaults 4 and ``block_length // 2``); lossless
        w.r.t. ar_generate like linear spec."""
        mode = mode_config(Mode.FUSED_SPEC, self.default_block_length, block_length, use_lora=use_lora,
                           num_subblocks=num_subblocks, subblock_length=subblock_length)
        return self._batch(prompts, mode, max_new_tokens, **kw)

    def linear_spec_generate(self, prompts=None, max_new_tokens: int = 128, block_length: int | None = None,
                             threshold: float = 0.0, use_lora: bool = True, **kw) -> list[GenerationResult]:
        """Linear self-speculation: diffusion drafts verified by causal passes; lossless w.r.t. ar_generate."""
        mode = mode_config(Mode.SPEC, self.default_block_length, block_length, threshold, use_lora=use_lora)
        return self._batch(prompts, mode, max_new_tokens, **kw)

"""The public Python API: ``TriModeLM`` owns one model, one KV cache and one engine, and offers the
reference code's entry points (``ar_generate``, ``generate``, ``linear_spec_generate``) for batches of
prompts of any lengths, plus ``run`` for requests that mix modes or switch mode mid-way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from trimode.runtime.model.checkpoint import load_model, load_tokenizer
from trimode.runtime.engine import Engine
from trimode.runtime.executors.base import Executor, make_executor
from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.model.network import NLDModel
from trimode.runtime.request import (ARConfig, DiffusionConfig, GenerationRequest, GenerationResult, ModeConfig, RequestError,
                      SpecConfig, TokenCallback)
from trimode.runtime.sampling import SamplingParams
from trimode.runtime.model.tokenizer import Tokenizer


class TriModeLM:
    def __init__(self, model: NLDModel, tokenizer: Tokenizer | None = None, num_pages: int = 512,
                 page_size: int = 16, max_batch_size: int = 64,
                 executor: str | Callable[..., Executor] = "torch") -> None:
        """``executor``: a registered executor name, or a factory called as ``executor(model=, cache=)``
        (tensor parallelism wraps the torch executor this way: runtime.tensor_parallel)."""
        cfg = model.config
        param = next(model.parameters())
        self.model, self.tokenizer, self.config = model, tokenizer, cfg
        # the KV heads this process holds: all of them, or its share under tensor parallelism
        num_kv_heads = model.encoder.layers[0].self_attn.hkv
        self.cache = PagedKVCache(cfg.num_hidden_layers, num_kv_heads, cfg.head_dim, num_pages, page_size,
                                  dtype=param.dtype, device=param.device)
        if callable(executor):
            self.executor = executor(model=model, cache=self.cache)
        else:
            self.executor = make_executor(executor, model=model, cache=self.cache)
        self.engine = Engine(self.executor, cfg.mask_token_id, cfg.max_position_embeddings, max_batch_size)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype | None = None, device: str = "cpu",
                        **kwargs) -> "TriModeLM":
        model = load_model(path, dtype=dtype, device=device)
        return cls(model, load_tokenizer(path, model.config), **kwargs)

    @classmethod
    def from_engine(cls, path: str | Path, executor: str = "onnxruntime", **kwargs) -> "TriModeLM":
        """A runtime over an engine directory (scripts/build_engine.py); the manifest is checked first."""
        from trimode.runtime.executors.engine_dir import open_engine

        return open_engine(path, executor=executor, **kwargs)

    # ---- prompts and requests -------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> tuple[int, ...]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this checkpoint has no tokenizer: pass token ids instead of text")
            return tuple(self.tokenizer.encode(prompt))
        ids = tuple(int(t) for t in prompt)
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary (size {self.config.vocab_size})")
        return ids

    def request(self, prompt: str | Sequence[int], max_new_tokens: int, mode: ModeConfig,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                eos_token_ids: Iterable[int] | None = None, stop_token_ids: Iterable[int] = (),
                switches: Sequence[tuple[int, ModeConfig]] = ()) -> GenerationRequest:
        eos = self.config.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
        return GenerationRequest(self.encode(prompt), max_new_tokens, mode, SamplingParams(temperature, top_k, top_p, seed),
                                 frozenset(eos) | frozenset(stop_token_ids), tuple(switches))

    def run(self, requests: Sequence[GenerationRequest], on_tokens: TokenCallback | None = None,
            raise_on_error: bool = True) -> list[GenerationResult]:
        """Run requests together (continuous batching); mixed modes share forwards."""
        results = self.engine.run(list(requests), on_tokens)
        for r in results:
            if self.tokenizer is not None:
                r.text = self.tokenizer.decode(r.token_ids)
        failed = [r for r in results if r.exception is not None]
        if raise_on_error and failed:
            raise failed[0].exception
        return results

    def _batch(self, prompts, mode: ModeConfig, max_new_tokens: int, **kw) -> list[GenerationResult]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self.run([self.request(p, max_new_tokens, mode, **kw) for p in prompts])

    # ---- the reference code's entry points --------------------------------------------------------------

    def ar_generate(self, prompts, max_new_tokens: int = 128, **kw) -> list[GenerationResult]:
        """Autoregressive decoding: one token per forward."""
        return self._batch(prompts, ARConfig(), max_new_tokens, **kw)

    def generate(self, prompts, max_new_tokens: int = 128, block_length: int | None = None, policy: str = "threshold",
                 threshold: float | None = None, max_steps: int | None = None, causal_context: bool = True,
                 **kw) -> list[GenerationResult]:
        """Block diffusion: denoise blocks of ``block_length`` (default: the config's block_size).
        ``threshold`` (policy 'threshold' only) defaults to 0.9, the model card's setting."""
        if policy == "threshold" and threshold is None:
            threshold = 0.9
        mode = DiffusionConfig(block_length or self.config.block_size, policy, threshold, max_steps, causal_context)
        return self._batch(prompts, mode, max_new_tokens, **kw)

    def linear_spec_generate(self, prompts, max_new_tokens: int = 128, block_length: int | None = None,
                             threshold: float = 0.0, use_lora: bool = True, **kw) -> list[GenerationResult]:
        """Linear self-speculation: diffusion drafts verified by causal passes; lossless w.r.t. ar_generate."""
        mode = SpecConfig(block_length or self.config.block_size, threshold, use_lora)
        return self._batch(prompts, mode, max_new_tokens, **kw)

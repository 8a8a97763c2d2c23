"""The executor interface and its registry.

An executor turns a step's passes into logits. Every executor reads and writes the one ``PagedKVCache`` it is
given: kept passes write their K/V at their positions (the scheduler has reserved the pages), other passes only
read. Executors are registered by name; the built-in ones (``torch``, ``onnxruntime``, ``tensorrt``) are
imported on first use by ``make_executor``, so naming one never depends on what happens to be imported, and
optional heavy dependencies (onnxruntime, TensorRT) load only when their executor is made.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch

from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.passes import SeqPass


class Executor(ABC):
    """Runs one forward over a batch of passes; returns fp32 logits ``[num_logits, V]`` per pass.

    Lifecycle: ``keepalive()`` is called by an idle server more often than any collective timeout (a no-op
    unless the executor drives other ranks), ``close()`` releases what the executor holds (sessions,
    contexts, worker ranks); both are safe to call more than once.
    """

    cache: PagedKVCache

    @abstractmethod
    def forward(self, passes: Sequence[SeqPass]) -> list[torch.Tensor]: ...

    def keepalive(self) -> None:
        """Tell whatever waits on this executor (tensor-parallel workers) that it is alive. Default: nothing."""

    def close(self) -> None:
        """Release resources. Default: nothing to release."""


_REGISTRY: dict[str, Callable[..., Executor]] = {}
# name -> module that registers it when imported (make_executor imports it on first use)
BUILTIN_EXECUTORS = {
    "torch": "trimode.runtime.executors.torch_executor",
    "onnxruntime": "trimode.runtime.executors.onnx_executor",
    "tensorrt": "trimode.runtime.executors.trt_executor",
}


def register_executor(name: str) -> Callable:
    """Class decorator: make ``make_executor(name, ...)`` construct the decorated executor."""
    def wrap(factory: Callable[..., Executor]) -> Callable[..., Executor]:
        _REGISTRY[name] = factory
        return factory
    return wrap


def make_executor(name: str, **kwargs) -> Executor:
    """The executor registered as ``name``, constructed with ``kwargs``. Built-in executors are imported here
    on first use. Raises ValueError naming the executors there are for an unknown name."""
    if name not in _REGISTRY and name in BUILTIN_EXECUTORS:
        importlib.import_module(BUILTIN_EXECUTORS[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown executor {name!r}; available: {sorted(set(_REGISTRY) | set(BUILTIN_EXECUTORS))}")
    return _REGISTRY[name](**kwargs)

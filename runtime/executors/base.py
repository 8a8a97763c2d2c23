"""The executor interface and its registry.

An executor turns a step's passes into logits, or, for passes that ask (``SeqPass.decide``) and executors that
can (``decides``), into the engine's greedy decisions (``PassOutput``). Every executor reads and writes the one ``PagedKVCache`` it is
given: kept passes write their K/V at their positions (the scheduler has reserved the pages), other passes only
read. Executors are registered by name; the built-in ones (``torch``, ``onnxruntime``, ``tensorrt``) are
imported on first use by ``make_executor``, so naming one never depends on what happens to be imported, and
optional heavy dependencies (onnxruntime, TensorRT) load only when their executor is made.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Callable, Sequence

from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.passes import PassOutput, SeqPass


class Executor(ABC):
    """Runs one forward over a batch of passes; returns a ``PassOutput`` per pass: fp32 logits ``[num_logits, V]``,
    or, where the pass ``decide``s and the executor ``decides``, the decision of the engine's ``draft_verify`` /
    ``confidence_unmask`` (docs/kernels.md "Engines that decide"). An executor that does not decide never gets a
    deciding pass (the engine clears the flag).

    ``output_bytes``: the bytes of every output handed back so far (``PassOutput.num_bytes``): logits rows where
    a pass returns them (in device memory on a GPU, where the policies choose from them with device ops), the
    decisions otherwise (a few int32 / fp32 per pass, copied to the host).

    Lifecycle: ``keepalive()`` is called by an idle server more often than any collective timeout (a no-op
    unless the executor drives other ranks), ``close()`` releases what the executor holds (sessions,
    contexts, worker ranks); both are safe to call more than once.
    """

    cache: PagedKVCache
    decides: bool = False
    output_bytes: int = 0

    @abstractmethod
    def forward(self, passes: Sequence[SeqPass]) -> list[PassOutput]: ...

    def count(self, outputs: list[PassOutput]) -> list[PassOutput]:
        """Add ``outputs``' bytes to ``output_bytes``; returns them."""
        self.output_bytes += sum(o.num_bytes for o in outputs)
        return outputs

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

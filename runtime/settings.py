"""Runtime settings: the one home of the KV-cache geometry, the batch limit, the executor, the kernels, the
weights dtype and the CPU threads, with their defaults. ``TriModeLM``, the assembly functions, the ``trimode`` CLI
options and the Triton model's ``config.pbtxt`` parameters all read them from here (``add_arguments``,
``TRITON_PARAMETERS``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
KERNELS = ("auto", "reference", "triton")  # trimode.plugins.dispatch.BACKENDS
THREADS_ENV = "TRIMODE_THREADS"


class SettingsError(ValueError):
    """A runtime setting out of range; the message names the setting and what is allowed."""


@dataclass(frozen=True)
class RuntimeSettings:
    """How a runtime is sized and what computes it. Frozen and checked once (``SettingsError``).

    ``num_pages`` x ``page_size`` tokens of KV per layer (one pool for every mode); ``max_batch_size``
    sequences in the running batch (the rest wait); ``executor`` a registered executor name
    (runtime.executors.base); ``kernels`` the op backend of the torch executor ("" = the TRIMODE_KERNELS
    environment variable, else "auto"); ``dtype`` the weights' dtype ("" = the checkpoint's on GPU, float32
    on CPU); ``threads`` the CPU threads of the forward pass (0 = ``resolve_threads``' default; see
    ``ThreadPlan`` for how torch's and onnxruntime's pools share them).
    """

    num_pages: int = field(default=512, metadata={"help": "KV pages in the one page pool"})
    page_size: int = field(default=16, metadata={"help": "tokens per KV page"})
    max_batch_size: int = field(default=64, metadata={
        "help": "sequences in the running batch at once; the rest wait",
        "triton": "max_concurrent_requests"})
    executor: str = field(default="torch", metadata={"help": "executor: torch, onnxruntime or tensorrt"})
    kernels: str = field(default="", metadata={
        "help": "op backend of the torch executor: auto, reference or triton (default: $TRIMODE_KERNELS, else "
                "auto)", "choices": ("",) + KERNELS, "triton": None})  # not a Triton parameter (yet)
    dtype: str = field(default="", metadata={"help": "weights dtype (default: the checkpoint's)",
                                             "choices": ("",) + DTYPES})
    threads: int = field(default=0, metadata={
        "help": "CPU threads of the forward pass: torch's pool for the torch executor; onnxruntime's for the "
                "onnxruntime executor, torch then keeping 1 for the work between passes (default 0: "
                f"${THREADS_ENV}, else one per 64 MiB of weights up to torch's default for this machine)",
        "minimum": 0})
    # the fields set explicitly (with_ / from_args), as opposed to left at their defaults: an engine directory's
    # limits replace only what was not given (runtime.assembly.settings_within)
    given: frozenset = field(default=frozenset(), compare=False, repr=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        if not self.given:  # constructed directly: what differs from the defaults was given
            object.__setattr__(self, "given", frozenset(
                f.name for f in fields(self) if not f.metadata.get("internal") and getattr(self, f.name) != f.default))
        for name in ("num_pages", "page_size", "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SettingsError(f"{name} must be an integer >= 1, got {value!r}")
        if self.kernels not in ("",) + KERNELS:
            raise SettingsError(f"kernels must be one of {KERNELS} (or '' for the default), got {self.kernels!r}")
        if self.dtype not in ("",) + DTYPES:
            raise SettingsError(f"dtype must be one of {DTYPES} (or '' for the checkpoint's), got {self.dtype!r}")
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 0:
            raise SettingsError(f"threads must be an integer >= 0 (0: the machine's default), got {self.threads!r}")
        if not isinstance(self.executor, str) or not self.executor:
            raise SettingsError(f"executor must be an executor name, got {self.executor!r}")

    def with_(self, **changes: Any) -> "RuntimeSettings":
        """A copy with ``changes`` applied (None values are ignored) and recorded as ``given``, checked again."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **changes, given=self.given | frozenset(changes))

    @property
    def torch_dtype(self) -> str | None:
        return self.dtype or None

    @property
    def executor_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of the executor: the torch executor's kernel backend (when one is forced) and
        the threads of the torch and onnxruntime executors (when set)."""
        out: dict[str, Any] = {"kernels": self.kernels} if self.kernels and self.executor == "torch" else {}
        if self.threads and self.executor in THREADED_EXECUTORS:
            out["threads"] = self.threads
        return out


THREADED_EXECUTORS = ("torch", "onnxruntime")  # executors taking ``threads=``
_MACHINE_THREADS: list[int] = []


def machine_threads() -> int:
    """Torch's intra-op thread count as this process first saw it: the physical cores it may use, or
    OMP_NUM_THREADS, or what a tensor-parallel launch gave each rank (runtime.parallel.comm). Read once, so
    that a later ``ThreadPlan.apply`` does not change the default."""
    if not _MACHINE_THREADS:
        import torch

        _MACHINE_THREADS.append(max(1, torch.get_num_threads()))
    return _MACHINE_THREADS[0]


# Default threads: one per this many bytes of weights, up to machine_threads(). An intra-op pool synchronises its
# threads on every op (microseconds each), which costs more than it saves on small matmuls: the 3 M-parameter
# tiny model (12 MiB in fp32) runs its batch-1 passes fastest on one thread (docs/performance.md, "Thread pools").
BYTES_PER_THREAD = 64 << 20


def resolve_threads(threads: int | None = 0, weight_bytes: int | None = None) -> int:
    """The thread count a runtime uses: ``threads`` if > 0, else the ``TRIMODE_THREADS`` environment variable,
    else ``machine_threads()``, or, given the model's ``weight_bytes``, one thread per ``BYTES_PER_THREAD``
    within it (at least 1). Raises ``SettingsError`` for a negative count or a malformed variable."""
    if threads is not None and threads < 0:
        raise SettingsError(f"threads must be an integer >= 0 (0: the machine's default), got {threads!r}")
    if threads:
        return threads
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise SettingsError(f"{THREADS_ENV} must be an integer >= 1, got {env!r}")
        return int(env)
    if weight_bytes is None:
        return machine_threads()
    return max(1, min(machine_threads(), -(-weight_bytes // BYTES_PER_THREAD)))


@dataclass(frozen=True)
class ThreadPlan:
    """Who gets the CPU threads: ``torch_threads`` for torch's intra-op (OpenMP) pool, ``executor_threads`` for
    the executor's own pool (0: it has none). Two busy pools on the same cores slow each other down (an
    OpenMP worker spinning after the host's block-sized work takes a core from onnxruntime's pool), so only the
    pool that runs the forward gets ``threads``: the torch executor's forward is torch's, and an executor with
    its own pool (onnxruntime) leaves torch one thread for the work between passes (sampling, acceptance,
    unmasking on a few rows of logits)."""

    torch_threads: int
    executor_threads: int

    @classmethod
    def for_executor(cls, executor: str, threads: int | None = 0, weight_bytes: int | None = None) -> "ThreadPlan":
        """The plan of ``executor`` for ``threads`` (0 / None: ``resolve_threads(0, weight_bytes)``)."""
        n = resolve_threads(threads, weight_bytes)
        return cls(1, n) if executor == "onnxruntime" else cls(n, 0)

    def apply(self) -> None:
        """Set torch's intra-op pool (process-wide; the last executor made in a process decides)."""
        import torch

        machine_threads()  # the default is read before it is first changed
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)


DEFAULTS = RuntimeSettings()
# the settings `trimode generate` takes as options (its --executor is its own: it picks how an engine runs)
GENERATE_OPTIONS = ("num_pages", "page_size", "max_batch_size", "kernels", "dtype", "threads")


def positive_int(option: str, minimum: int = 1):
    """An argparse ``type`` accepting integers >= ``minimum``; the error names ``option`` and what was given."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{option} must be an integer >= {minimum}, got {value}")
        return value
    return parse


def _option(f) -> str:
    return "--" + (f.metadata.get("triton") or f.name).replace("_", "-")


# what runs an engine directory (TriModeLM.from_engine): auto = tensorrt where its plans can run in this process,
# else onnxruntime; torch = the engine's checkpoint
ENGINE_EXECUTORS = ("auto", "tensorrt", "onnxruntime", "torch")

# the settings an engine directory's build-time limits size when they are not given (RuntimeSettings.given)
ENGINE_SIZED = ("num_pages", "page_size", "max_batch_size")


def add_arguments(parser: argparse.ArgumentParser | Any, names: tuple[str, ...] | None = None,
                  unset: bool = False) -> None:
    """Add ``--num-pages``, ``--page-size``, ``--max-concurrent-requests`` (max_batch_size), ``--executor``,
    ``--kernels``, ``--dtype``, ``--threads`` (or only ``names``, in that order) with the defaults above; read them
    back with ``from_args``. ``unset``: an option not given parses as None (``from_args`` then leaves the field
    at its default and not ``given``, so an engine directory's limits may size it)."""
    by_name = {f.name: f for f in fields(RuntimeSettings) if not f.metadata.get("internal")}
    for f in (by_name[name] for name in (by_name if names is None else names)):
        text = f.metadata["help"]
        kw: dict[str, Any] = {"dest": f.name, "default": None if unset else f.default,
                              "help": text if "default" in text else
                              f"{text} (default {f.default}" + ("; with an engine directory its build-time limit)"
                                                                if unset and f.name in ENGINE_SIZED else ")")}
        if f.type in ("int", int):
            kw["type"] = positive_int(_option(f), f.metadata.get("minimum", 1))
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        else:
            kw["metavar"] = _option(f)[2:].upper().replace("-", "_")
        parser.add_argument(_option(f), **kw)


def from_args(args: argparse.Namespace, names: tuple[str, ...] | None = None,
              base: RuntimeSettings = DEFAULTS) -> RuntimeSettings:
    """The settings of parsed arguments: the fields ``names`` (default: all) that ``add_arguments`` added,
    the others from ``base``."""
    return base.with_(**{f.name: getattr(args, f.name, None) for f in fields(RuntimeSettings)
                         if not f.metadata.get("internal") and (names is None or f.name in names)})


# Triton config.pbtxt parameter name -> (default as text, parser, settings field)
TRITON_PARAMETERS = {f.metadata.get("triton", f.name): (str(f.default), int if f.type in ("int", int) else str, f.name)
                     for f in fields(RuntimeSettings)
                     if f.metadata.get("triton", f.name) is not None and not f.metadata.get("internal")}


def to_parameters(settings: RuntimeSettings) -> dict[str, str]:
    """The settings as Triton model parameters (``config.pbtxt`` strings)."""
    return {name: str(getattr(settings, field_name)) for name, (_, _, field_name) in TRITON_PARAMETERS.items()}


def from_parameters(params: dict[str, Any]) -> RuntimeSettings:
    """The settings of parsed Triton parameters (keys of ``TRITON_PARAMETERS``)."""
    return RuntimeSettings(**{field_name: params[name] for name, (_, _, field_name) in TRITON_PARAMETERS.items()
                              if name in params})

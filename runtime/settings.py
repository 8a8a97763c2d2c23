"""Runtime settings: the one home of the KV-cache geometry, the batch limit, the executor, the kernels and the
weights dtype, with their defaults. ``TriModeLM``, the assembly functions, the ``trimode`` CLI options and the
Triton model's ``config.pbtxt`` parameters all read them from here (``add_arguments``, ``TRITON_PARAMETERS``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
KERNELS = ("auto", "reference", "triton")  # trimode.plugins.dispatch.BACKENDS


class SettingsError(ValueError):
    """A runtime setting out of range; the message names the setting and what is allowed."""


@dataclass(frozen=True)
class RuntimeSettings:
    """How a runtime is sized and what computes it. Frozen and checked once (``SettingsError``).

    ``num_pages`` x ``page_size`` tokens of KV per layer (one pool for every mode); ``max_batch_size``
    sequences in the running batch (the rest wait); ``executor`` a registered executor name
    (runtime.executors.base); ``kernels`` the op backend of the torch executor ("" = the TRIMODE_KERNELS
    environment variable, else "auto"); ``dtype`` the weights' dtype ("" = the checkpoint's on GPU, float32
    on CPU).
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

    def __post_init__(self) -> None:
        for name in ("num_pages", "page_size", "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SettingsError(f"{name} must be an integer >= 1, got {value!r}")
        if self.kernels not in ("",) + KERNELS:
            raise SettingsError(f"kernels must be one of {KERNELS} (or '' for the default), got {self.kernels!r}")
        if self.dtype not in ("",) + DTYPES:
            raise SettingsError(f"dtype must be one of {DTYPES} (or '' for the checkpoint's), got {self.dtype!r}")
        if not isinstance(self.executor, str) or not self.executor:
            raise SettingsError(f"executor must be an executor name, got {self.executor!r}")

    def with_(self, **changes: Any) -> "RuntimeSettings":
        """A copy with ``changes`` applied (None values are ignored), checked again."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def torch_dtype(self) -> str | None:
        return self.dtype or None

    @property
    def executor_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of the torch executor (its kernel backend, when one is forced)."""
        return {"kernels": self.kernels} if self.kernels and self.executor == "torch" else {}


DEFAULTS = RuntimeSettings()
# the settings `trimode generate` takes as options (its --executor is its own: it picks how an engine runs)
GENERATE_OPTIONS = ("num_pages", "page_size", "max_batch_size", "kernels", "dtype")


def positive_int(option: str):
    """An argparse ``type`` accepting integers >= 1; the error names ``option``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{option} must be an integer >= 1, got {text!r}")
        return value
    return parse


def _option(f) -> str:
    return "--" + (f.metadata.get("triton") or f.name).replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser | Any, names: tuple[str, ...] | None = None) -> None:
    """Add ``--num-pages``, ``--page-size``, ``--max-concurrent-requests`` (max_batch_size), ``--executor``,
    ``--kernels``, ``--dtype`` (or only ``names``, in that order) with the defaults above; read them back with
    ``from_args``."""
    by_name = {f.name: f for f in fields(RuntimeSettings)}
    for f in (by_name[name] for name in (by_name if names is None else names)):
        text = f.metadata["help"]
        kw: dict[str, Any] = {"dest": f.name, "default": f.default,
                              "help": text if "default" in text else f"{text} (default {f.default})"}
        if f.type in ("int", int):
            kw["type"] = positive_int(_option(f))
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
                         if names is None or f.name in names})


# Triton config.pbtxt parameter name -> (default as text, parser, settings field)
TRITON_PARAMETERS = {f.metadata.get("triton", f.name): (str(f.default), int if f.type in ("int", int) else str, f.name)
                     for f in fields(RuntimeSettings) if f.metadata.get("triton", f.name) is not None}


def to_parameters(settings: RuntimeSettings) -> dict[str, str]:
    """The settings as Triton model parameters (``config.pbtxt`` strings)."""
    return {name: str(getattr(settings, field_name)) for name, (_, _, field_name) in TRITON_PARAMETERS.items()}


def from_parameters(params: dict[str, Any]) -> RuntimeSettings:
    """The settings of parsed Triton parameters (keys of ``TRITON_PARAMETERS``)."""
    return RuntimeSettings(**{field_name: params[name] for name, (_, _, field_name) in TRITON_PARAMETERS.items()
                              if name in params})

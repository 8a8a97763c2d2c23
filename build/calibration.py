"""Calibration data and the calibration forward loop.

Samples are windows of ``seq_len`` tokens cut from a text, spread evenly over it. The text is, in this order:
``--calib-text``, ``--calib-file``, ``--calib-dataset`` (a Hugging Face dataset, streamed with the optional
``datasets`` package), the checkpoint's own ``calibration.txt`` / ``heldout.txt``, else the default shipped
with trimode: ``build/data/calibration_kjv.txt``, 20 chapters of the King James Bible (public domain; see
``build/data/README.md``), so a quantized build works offline. Each sample is run twice, the two ways the model
is used: causally (AR, prefill, verify, commit) and with its last ``block_size`` tokens as a draft block
([seed, MASK, ...], block-bidirectional, the drafter LoRA on), so activation ranges cover every kind.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from trimode.runtime.model.network import NLDModel
from trimode.runtime.model.tokenizer import Tokenizer

DEFAULT_TEXT_FILES = ("calibration.txt", "heldout.txt")
SHIPPED_TEXT = "calibration_kjv.txt"
SHIPPED_SOURCE = f"{SHIPPED_TEXT} (trimode's default: King James Bible chapters, public domain)"
CHARS_PER_TOKEN = 8  # characters taken from a dataset per calibration token needed (generous: ~4 are typical)


class CalibrationError(ValueError):
    """No usable calibration text, with what to pass instead."""


def shipped_text() -> str:
    """The default calibration text shipped inside the package (``build/data/calibration_kjv.txt``)."""
    from importlib.resources import files

    return files("trimode.build").joinpath("data", SHIPPED_TEXT).read_text(encoding="utf-8")


def check_calibration_source(calib_file: str | Path | None, calib_text: str | None,
                             calib_dataset: str | None) -> None:
    """Refuse, before a build writes anything, more than one source, a missing file, or a dataset name without
    the ``datasets`` package (``CalibrationError`` saying what to do)."""
    given = [name for name, value in (("--calib-text", calib_text), ("--calib-file", calib_file),
                                      ("--calib-dataset", calib_dataset)) if value is not None]
    if len(given) > 1:
        raise CalibrationError(f"{' and '.join(given)} both name calibration text; pass one of them")
    if calib_file is not None and not Path(calib_file).is_file():
        raise CalibrationError(f"calibration file {calib_file} does not exist")
    if calib_dataset is not None:
        _import_datasets()


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise CalibrationError("--calib-dataset needs the Hugging Face `datasets` package, which is not installed: "
                               "pip install datasets (or pass --calib-file FILE)") from None
    return datasets


def dataset_text(name: str, num_chars: int, split: str = "train") -> str:
    """About ``num_chars`` characters of a Hugging Face dataset's text, streamed (only what is needed is read).

    ``name`` is ``NAME`` or ``NAME:CONFIG`` (e.g. ``Salesforce/wikitext:wikitext-2-raw-v1``); the rows' ``text``
    column is used, else their first string column; rows are joined by newlines. Raises ``CalibrationError``
    without ``datasets``, for a dataset that cannot be loaded (offline, unknown name) or one without text."""
    datasets = _import_datasets()
    path, _, config = name.partition(":")
    try:
        rows = iter(datasets.load_dataset(path, config or None, split=split, streaming=True))
        parts, size = [], 0
        for row in rows:
            column = "text" if isinstance(row.get("text"), str) else next(
                (k for k, v in row.items() if isinstance(v, str)), None)
            if column is None:
                raise CalibrationError(f"dataset {name!r} has no text column (columns: {sorted(row)})")
            if row[column].strip():
                parts.append(row[column])
                size += len(row[column]) + 1
            if size >= num_chars:
                break
    except CalibrationError:
        raise
    except Exception as e:  # datasets / huggingface_hub raise many types (network, missing config, ...)
        raise CalibrationError(f"calibration dataset {name!r} could not be loaded: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not parts:
        raise CalibrationError(f"calibration dataset {name!r} ({split} split) has no text")
    return "\n".join(parts)


def resolve_calibration_text(model_dir: str | Path, calib_file: str | Path | None = None,
                             calib_text: str | None = None, calib_dataset: str | None = None,
                             num_tokens: int = 32 * 256) -> tuple[str, str]:
    """(text, source name) in the order of the module docstring; a source name is never an absolute path.
    ``num_tokens`` sizes what is read from a dataset. Raises ``CalibrationError``."""
    check_calibration_source(calib_file, calib_text, calib_dataset)
    if calib_text is not None:
        return calib_text, "text"
    if calib_file is not None:
        return Path(calib_file).read_text(encoding="utf-8"), Path(calib_file).name
    if calib_dataset is not None:
        return dataset_text(calib_dataset, num_tokens * CHARS_PER_TOKEN), f"dataset {calib_dataset}"
    own = find_default_text(model_dir)
    if own is not None:
        return own.read_text(encoding="utf-8"), own.name
    return shipped_text(), SHIPPED_SOURCE


@dataclass(frozen=True)
class CalibrationSet:
    samples: list[torch.Tensor]  # each [seq_len] int64
    source: str  # a file name or "text"; never an absolute path
    num_text_tokens: int


def find_default_text(model_dir: str | Path) -> Path | None:
    for name in DEFAULT_TEXT_FILES:
        if (Path(model_dir) / name).is_file():
            return Path(model_dir) / name
    return None


def calibration_set(tokenizer: Tokenizer | None, text: str, source: str, num_samples: int,
                    seq_len: int) -> CalibrationSet:
    """``num_samples`` windows of ``seq_len`` tokens spread evenly over ``text`` (overlapping if it is short)."""
    if tokenizer is None:
        raise CalibrationError("the checkpoint has no tokenizer.json: calibration text cannot be tokenized")
    if num_samples < 1 or seq_len < 2:
        raise CalibrationError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples} and {seq_len}")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if len(ids) < seq_len:
        raise CalibrationError(f"calibration text ({source}) has {len(ids)} tokens, fewer than one sample of "
                               f"{seq_len}: pass a longer text or a smaller --calib-seq-len")
    last = len(ids) - seq_len
    starts = [round(i * last / max(num_samples - 1, 1)) for i in range(num_samples)]
    return CalibrationSet([ids[s:s + seq_len] for s in starts], source, len(ids))


def block_allowed(seq_len: int, block: int) -> torch.Tensor:
    """[S, S] mask of a diffusion block: a causal prefix of S - block tokens, and a last block that sees the
    whole prefix and the whole block."""
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    allowed[seq_len - block:, seq_len - block:] = True
    return allowed


def calibration_forward(model: NLDModel, ids: torch.Tensor, allowed: torch.Tensor,
                        lora_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A dense forward whose attention also feeds the K/V quantizers (``k_bmm_quantizer`` / ``v_bmm_quantizer``
    attached to each layer's ``self_attn`` for an FP8 KV cache), so they see the K/V the cache would hold."""
    positions = torch.arange(ids.shape[-1])[None]
    mask = allowed[None, None]
    layers = model.encoder.layers

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attn = layers[i].self_attn
        if getattr(attn, "k_bmm_quantizer", None) is not None:
            k, v = attn.k_bmm_quantizer(k), attn.v_bmm_quantizer(v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=model.config.softmax_scale, enable_gqa=True)
        return out.transpose(1, 2)

    hidden = model.forward_hidden(ids[None], positions, attend, None if lora_mask is None else lora_mask[None])
    return model.logits(hidden)


def make_forward_loop(calib: CalibrationSet, progress: bool = True) -> Callable[[NLDModel], None]:
    """The ``forward_loop`` ModelOpt calls (possibly several times, e.g. AWQ's search): every sample causally
    and as a masked diffusion block."""
    from tqdm import tqdm

    def loop(model: NLDModel) -> None:
        cfg = model.config
        block = min(cfg.block_size, len(calib.samples[0]) - 1)
        seq_len = len(calib.samples[0])
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        diffusion = block_allowed(seq_len, block)
        lora_mask = torch.zeros(seq_len, dtype=torch.bool)
        lora_mask[seq_len - block:] = True
        bar = tqdm(calib.samples, desc="calibration", unit="sample", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True)
        with torch.no_grad():
            for ids in bar:
                calibration_forward(model, ids, causal)
                masked = ids.clone()
                masked[seq_len - block + 1:] = cfg.mask_token_id  # a draft block: [seed, MASK, ...]
                calibration_forward(model, masked, diffusion, lora_mask if model.lora is not None else None)

    return loop

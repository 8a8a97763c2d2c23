"""Helpers for the build tests: a checkpoint to quantize, calibration / evaluation text, and running
scripts/build_engine.py in child processes (several at once: ModelOpt exports once per process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from trimode.runtime.model.checkpoint import load_model, save_checkpoint, write_random_checkpoint
from trimode.runtime.model.config import tiny_config
from trimode.runtime.model.tokenizer import word_level_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "tiny-kjv"
BUILD_SCRIPT = ROOT / "scripts" / "build_engine.py"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TRIMODE_TEST_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def quant_config():
    """in_features 128 / 256: whole INT4 groups of 128 everywhere, as in the real models."""
    return tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, block_size=8)


def tame_random_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random checkpoint whose decoder layers are a small update to the residual stream (layer weights scaled
    down), so greedy tokens are not decided by chaos: a stand-in until the trained tiny model ships."""
    write_random_checkpoint(path, quant_config(), seed=seed, lora_rank=4)
    model = load_model(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("encoder.layers.") and name.endswith("proj.weight"):
                p.mul_(0.1)
    cfg = model.config
    special = {cfg.mask_token_id: "<|mask|>", cfg.bos_token_id: "<s>", cfg.eos_token_ids[0]: "</s>"}
    return save_checkpoint(model, path, dtype="float32", tokenizer=word_level_tokenizer(cfg.vocab_size, special))


def random_text(num_words: int, seed: int, vocab: int = 512) -> str:
    gen = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(4, vocab, (num_words,), generator=gen).tolist())


def shipped_heldout_text() -> str | None:
    """The shipped model's held-out text: its heldout.txt, else the corpus split of scripts/kjv_corpus.py when
    the corpus is already on disk (never fetched here)."""
    for name in ("heldout.txt", "calibration.txt"):
        if (SHIPPED / name).is_file():
            return (SHIPPED / name).read_text(encoding="utf-8")
    if (ROOT / "data" / "kjv.txt").is_file():
        sys.path.insert(0, str(ROOT / "scripts"))
        import kjv_corpus

        return kjv_corpus.load_splits()[1]
    return None


def source_model(tmp: Path) -> tuple[Path, str, str]:
    """(checkpoint, calibration text, evaluation text): the shipped tiny model with the two halves of its held-out
    text if both exist, else a tame random model with random word text."""
    text = shipped_heldout_text() if (SHIPPED / "config.json").is_file() else None
    if text is not None:
        half = len(text) // 2
        return SHIPPED, text[:half], text[half:]
    return tame_random_checkpoint(tmp / "source"), random_text(6000, 1), random_text(6000, 2)


def start_build(model: Path, out: Path, recipe: str, *extra: str, calib_text: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(BUILD_SCRIPT), "--model", str(model), "--out", str(out), "--quant", recipe,
           "--block-length", "8", "--max-batch", "4", "--max-seq", "256", "--page-size", "4", "--no-progress",
           "--calib-samples", "12", "--calib-seq-len", "96", *extra]
    if calib_text is not None:
        cmd += ["--calib-text", calib_text]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"build failed ({proc.returncode}):\n{err[-3000:]}"
    return out, err

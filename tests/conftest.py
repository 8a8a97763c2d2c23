"""Shared fixtures: random tiny checkpoints in the real NLD format, written once per session."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: one intra-op thread per test process keeps timings sane next to other work.
torch.set_num_threads(int(os.environ.get("TRIMODE_TEST_THREADS", "1")))

from trimode.runtime.api import TriModeLM  # noqa: E402
from trimode.runtime.model.checkpoint import write_random_checkpoint  # noqa: E402
from trimode.runtime.model.config import RopeConfig, tiny_config  # noqa: E402

VARIANTS = {
    # name: (config overrides, lora rank)
    "gqa2-yarn-lora": (dict(), 4),
    "mha-default-rope": (dict(num_key_value_heads=4, rope=RopeConfig(rope_type="default", rope_theta=10000.0)), None),
    "gqa4-yarn-qscale": (dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                              rope=RopeConfig(rope_type="yarn", rope_theta=500.0, factor=8.0,
                                              original_max_position_embeddings=16, llama_4_scaling_beta=0.5)), 8),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for seed, (name, (overrides, rank)) in enumerate(VARIANTS.items()):
        out[name] = str(write_random_checkpoint(root / name, tiny_config(**overrides), seed=seed, lora_rank=rank))
    return out


@pytest.fixture(scope="session")
def ckpt(checkpoints) -> str:
    return checkpoints["gqa2-yarn-lora"]


def make_lm(path: str, **kw) -> TriModeLM:
    kw.setdefault("page_size", 4)
    kw.setdefault("num_pages", 256)
    return TriModeLM.from_pretrained(path, **kw)


def random_prompts(lengths, vocab=512, seed=0, avoid=(0, 1, 2, 3)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(len(avoid), vocab, (n,), generator=gen).tolist()
        out.append(ids)
    return out

"""Tests of the tiny-model training code (scripts/train_tiny.py and friends) and of the shipped checkpoint.

They run the real training code on a small synthetic corpus in the format of Debian's ``bible`` output, so
neither apt nor bible-kjv is needed; the shipped-checkpoint test is skipped until models/tiny-kjv exists.
"""

from __future__ import annotations

import random
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import kjv_corpus  # noqa: E402
import nld_objective as obj  # noqa: E402
import train_tiny  # noqa: E402

from trimode.runtime.model.checkpoint import load_model, load_tokenizer  # noqa: E402
from trimode.runtime.model.config import tiny_config  # noqa: E402
from trimode.runtime.model.network import NLDModel, causal_mask  # noqa: E402

SHIPPED = ROOT / "models" / "tiny-kjv"
_SUBJECTS = ["the LORD", "Moses", "the king", "the people", "David", "the priest", "Israel"]
_VERBS = ["spake unto", "went up to", "blessed", "gave bread to", "called", "smote", "came unto"]
_OBJECTS = ["the children of Israel", "the city", "his servants", "the house of God", "all the land"]


def fake_bible(num_chapters: int = 24, seed: int = 0) -> str:
    """Text in the layout of ``bible gen1:1-rev22:21``: chapter headers, verses wrapped at 78 columns."""
    rng = random.Random(seed)
    parts = []
    for c in range(num_chapters):
        verses = []
        for v in range(1, rng.randint(6, 12)):
            clauses = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}" for _ in range(3)]
            sentence = "And " + ", and ".join(clauses) + "."
            lines = textwrap.wrap(f"{v} {sentence}", 76)
            verses.append("  " + "\n".join(lines))
        parts.append(f"Book {c + 1}\n\n" + "\n".join(verses))
    return "\n" + "\n\n".join(parts) + "\n"


def test_chapters_are_parsed_and_split_deterministically():
    raw = fake_bible()
    chapters = kjv_corpus.parse_chapters(raw)
    assert len(chapters) == 24 and chapters[0].startswith("Book 1\n1 And ")
    assert all("\n\n" not in c and c.endswith(".\n") for c in chapters)  # wrapped verse lines were joined
    train, heldout = kjv_corpus.split_chapters(raw, seed=3, heldout_fraction=0.25)
    assert (train, heldout) == kjv_corpus.split_chapters(raw, seed=3, heldout_fraction=0.25)
    train_docs, heldout_docs = kjv_corpus.documents(train), kjv_corpus.documents(heldout)
    assert len(heldout_docs) == 6 and sorted(train_docs + heldout_docs) == sorted(chapters)
    assert heldout != kjv_corpus.split_chapters(raw, seed=4, heldout_fraction=0.25)[1]


def test_block_diff_mask_has_the_nld_pattern():
    length, block_size = 24, 8
    allowed = obj.block_diff_mask(length, block_size)
    assert allowed.shape == (2 * length, 2 * length) and allowed.dtype == torch.bool
    for q in range(2 * length):
        for k in range(2 * length):
            q_noisy, k_noisy = q < length, k < length
            qi, ki = q % length, k % length
            if q_noisy and k_noisy:  # within the same block, both directions
                want = qi // block_size == ki // block_size
            elif q_noisy:  # clean tokens of strictly earlier blocks only
                want = ki // block_size < qi // block_size
            elif k_noisy:  # clean never sees noisy
                want = False
            else:  # clean -> clean causal
                want = ki <= qi
            assert bool(allowed[q, k]) == want, (q, k)
    causal_blocks = obj.block_causal_mask(length, block_size)
    assert torch.equal(causal_blocks[:length, :length], allowed[:length, :length] & causal_mask(length))
    assert torch.equal(causal_blocks[:, length:], allowed[:, length:])


def test_noise_keeps_seed_slots_and_uses_the_nld_ratio():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(4, 50, (64, 32), generator=gen)
    x_t, is_masked, p, is_eligible = obj.add_noise(x0, 3, 8, gen, eps=1e-3, keep_seed_prob=1.0)
    assert (x_t[is_masked] == 3).all() and torch.equal(x_t[~is_masked], x0[~is_masked])
    assert not is_masked[:, ::8].any() and not is_eligible[:, ::8].any() and is_eligible[:, 1::8].all()
    assert ((p >= 1e-3) & (p <= 1.0)).all()
    rate = is_masked[:, 1:8].float().mean(dim=1)
    assert torch.corrcoef(torch.stack([rate, p[:, 0]]))[0, 1] > 0.8  # masking follows the per-sequence ratio


def test_joint_pass_ar_half_is_the_causal_model_and_blocks_are_isolated():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=64, block_size=8)
    model = NLDModel(cfg).eval()
    x0 = torch.randint(4, 64, (2, 24))
    gen = torch.Generator().manual_seed(1)
    noised = obj.add_noise(x0, cfg.mask_token_id, cfg.block_size, gen, keep_seed_prob=0.5)
    with torch.no_grad():
        _, l_ar, _ = obj.joint_loss(model, x0, *noised)
        assert torch.allclose(l_ar, obj.ar_loss(model, x0), atol=1e-5)
        # changing the noisy tokens of block 2 must not change the draft logits of blocks 0 and 1
        base = obj.draft_logits(model, x0, use_lora=False)
        x_t = torch.where(obj.is_seed_slot(24, 8), x0, cfg.mask_token_id)
        x_t2 = x_t.clone()
        x_t2[:, 17:] = 5
        positions = obj.doubled_positions(2, 24)
        mask = obj.block_diff_mask(24, 8)
        changed = model.forward_dense(torch.cat([x_t2, x0], 1), positions, mask)[:, :24]
        assert torch.allclose(base[:, :16], changed[:, :16], atol=1e-5)
        assert not torch.allclose(base[:, 16:], changed[:, 16:], atol=1e-5)


def test_rollout_equals_sequential_greedy_decoding():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=32, block_size=8)
    model = NLDModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)  # peaked logits: no ties
    x0 = torch.randint(4, 32, (2, 16))
    rollout = obj.greedy_block_rollout(model, x0)
    with torch.no_grad():
        for b in range(2):
            seq = x0[:, : b * 8 + 1].clone()
            for _ in range(7):
                length = seq.shape[1]
                logits = model.forward_dense(seq, torch.arange(length)[None].expand(2, length), causal_mask(length))
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            assert torch.equal(rollout[:, b * 8:(b + 1) * 8], seq[:, b * 8:])


def _settings(**changes) -> train_tiny.TrainSettings:
    base = dict(preset="test", vocab_size=320, seq_len=32, batch_size=8, lr=3e-3, unit="steps", ar_budget=30,
                joint_budget=30, lora_budget=6, eval_every=15, eval_windows=8, warmup_steps=5, max_threads=1)
    base.update(changes)
    return train_tiny.TrainSettings(**base)


def test_training_lowers_heldout_losses_and_writes_a_loadable_checkpoint(tmp_path):
    train_text, heldout_text = kjv_corpus.split_chapters(fake_bible(40), heldout_fraction=0.1)
    out = tmp_path / "model"
    summary = train_tiny.train(train_text, heldout_text, _settings(), out, log=lambda _: None)
    base_evals = [h["heldout"] for h in summary["history"] if h["phase"] != "lora"]
    first, last = base_evals[0], base_evals[-1]
    assert "accepted_lora" in summary["history"][-1]["heldout"] and "accepted_lora" in summary["final"]
    assert last["ar"] < first["ar"] - 1.5, (first, last)
    assert last["diff"] < first["diff"] - 1.0, (first, last)
    assert summary["steps"] == {"ar": 30, "joint": 30, "lora": 6}
    model, tok = load_model(out), load_tokenizer(out)
    assert model.lora is not None and model.lora.rank == 16
    assert model.config.mask_token_id == tok.token_to_id("<|mask|>")
    assert model.config.eos_token_ids == (tok.token_to_id("<|eot|>"),)
    assert (out / "training_log.json").exists()


def test_resume_continues_a_saved_run(tmp_path):
    train_text, heldout_text = kjv_corpus.split_chapters(fake_bible(30), heldout_fraction=0.1)
    work = tmp_path / "work"
    short = _settings(ar_budget=4, joint_budget=2, lora_budget=0)
    train_tiny.train(train_text, heldout_text, short, tmp_path / "a", work, log=lambda _: None)
    messages: list[str] = []
    summary = train_tiny.train(train_text, heldout_text, _settings(ar_budget=4, joint_budget=5, lora_budget=2),
                               tmp_path / "b", work, resume=True, log=messages.append)
    assert any(m.startswith("resuming") for m in messages)
    assert summary["steps"] == {"ar": 4, "joint": 5, "lora": 2}


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="models/tiny-kjv has not been trained yet")
def test_shipped_checkpoint_loads_and_is_small():
    model, tok = load_model(SHIPPED), load_tokenizer(SHIPPED)
    cfg = model.config
    assert tok is not None and model.lora is not None
    assert cfg.mask_token_id == tok.token_to_id("<|mask|>") and cfg.eos_token_ids == (tok.token_to_id("<|eot|>"),)
    assert tok.vocab_size == cfg.vocab_size
    assert sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file()) <= 20 * 2**20
    ids = tok.encode("Genesis 1\n1 In the beginning God created the heaven and the earth.\n2 And the")
    with torch.no_grad():
        logits = model.forward_dense(torch.tensor([ids]), torch.arange(len(ids))[None], causal_mask(len(ids)))
    assert tok.decode(ids).startswith("Genesis 1\n1 In the beginning")
    assert torch.isfinite(logits).all() and logits.shape == (1, len(ids), cfg.vocab_size)

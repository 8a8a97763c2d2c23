import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trimode.runtime.model.checkpoint import (CheckpointError, load_model, load_tokenizer, save_checkpoint,
                                        write_random_checkpoint)
from trimode.runtime.model.config import tiny_config
from trimode.runtime.model.network import causal_mask


def _logits(model, ids):
    s = len(ids)
    return model.forward_dense(torch.tensor([ids]), torch.arange(s)[None], causal_mask(s)).detach()


@pytest.mark.parametrize("shard", [None, 40_000])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_roundtrip_identical_logits(tmp_path, shard, dtype):
    src = write_random_checkpoint(tmp_path / "a", tiny_config(), seed=3, dtype=dtype, lora_rank=4)
    model = load_model(src)
    out = save_checkpoint(model, tmp_path / "b", dtype=dtype, max_shard_bytes=shard)
    if shard:
        assert (out / "model.safetensors.index.json").exists()
        assert len(list(out.glob("model-*.safetensors"))) > 1
    again = load_model(out)
    ids = [5, 9, 100, 7, 42]
    assert torch.equal(_logits(model, ids), _logits(again, ids))
    for a, b in zip(model.lora.lora_B, again.lora.lora_B):
        assert torch.equal(a, b)


def test_bf16_checkpoint_matches_its_own_fp32_upcast(tmp_path):
    src = write_random_checkpoint(tmp_path / "a", tiny_config(), seed=1, dtype="bfloat16")
    tensors = load_file(str(src / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    model = load_model(src)
    assert next(model.parameters()).dtype == torch.float32
    assert torch.equal(model.diffusion_head.weight, tensors["diffusion_head.weight"].float())


@pytest.fixture()
def good(tmp_path):
    return write_random_checkpoint(tmp_path / "good", tiny_config(), seed=0, lora_rank=2)


def _edit_weights(path, fn):
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file))


def test_missing_tensor(good):
    _edit_weights(good, lambda t: t.pop("encoder.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['encoder.layers.1.mlp.up_proj.weight'\]"):
        load_model(good)


def test_unexpected_tensor(good):
    _edit_weights(good, lambda t: t.update({"lm_head.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['lm_head.weight'\]"):
        load_model(good)


def test_shape_mismatch(good):
    _edit_weights(good, lambda t: t.update({"encoder.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"'encoder.norm.weight' has shape \(65,\).*\(64,\)"):
        load_model(good)


def test_unsupported_model_type(good):
    cfg = json.loads((good / "config.json").read_text())
    cfg["model_type"] = "llama"
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        load_model(good)


def test_corrupt_safetensors(good):
    data = (good / "model.safetensors").read_bytes()
    (good / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(good)


def test_garbage_header(good):
    (good / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(good)


def test_missing_shard(tmp_path):
    path = write_random_checkpoint(tmp_path / "s", tiny_config(), seed=0, max_shard_bytes=40_000)
    next(path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard files that do not exist"):
        load_model(path)


def test_tokenizer_vocab_mismatch(good, tmp_path):
    big = write_random_checkpoint(tmp_path / "big", tiny_config(vocab_size=600), seed=0)
    shutil.copy(big / "tokenizer.json", good / "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer has 600 tokens but config.json vocab_size is 512"):
        load_tokenizer(good)


def test_lora_rank_mismatch_and_any_rank(good):
    cfg = json.loads((good / "linear_spec_lora" / "adapter_config.json").read_text())
    cfg["r"] = 3
    (good / "linear_spec_lora" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"expected \(3, 64\) \(r=3\)"):
        load_model(good)


def test_lora_wrong_target(good):
    cfg = json.loads((good / "linear_spec_lora" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]
    (good / "linear_spec_lora" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="o_proj only"):
        load_model(good)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a checkpoint directory"):
        load_model(tmp_path / "nothing")


def test_meta_loading_skips_init_only_in_its_own_thread():
    """Loading (which skips initializers) in other threads must not leave this thread's modules uninitialized."""
    import threading

    from torch import nn

    from trimode.runtime.model import network as model_module
    from trimode.runtime.model.network import NLDModel, on_meta_device

    def load():
        for _ in range(10):
            with on_meta_device():
                NLDModel(tiny_config())

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(10):
        w = NLDModel(tiny_config()).encoder.embed_tokens.weight
        assert torch.isfinite(w).all() and w.std() > 0.5, "initializers were skipped outside on_meta_device"
    for t in threads:
        t.join()
    assert all(getattr(nn.init, n) is model_module._ORIGINAL_INIT[n] for n in model_module._INITIALIZERS)


def test_stream_decoder_increments_add_up_to_the_decoded_text():
    """Random pushes of 1-4 tokens (multi-byte characters split across tokens included) give exactly the
    decoded text, holding back only a trailing incomplete character."""
    import random

    from trimode.runtime.model.checkpoint import load_config
    from trimode.runtime.model.tokenizer import StreamDecoder

    shipped = Path(__file__).resolve().parents[3] / "models" / "tiny-kjv"
    tok = load_tokenizer(shipped, load_config(shipped))
    ids = tok.encode("In the beginning God created the heaven. Ünïcödé ✓ 日本語 — “quotes”\n12 And")
    rnd = random.Random(0)
    for _ in range(100):
        seq = ids + [rnd.randrange(2, tok.vocab_size) for _ in range(40)]
        decoder, out, i = StreamDecoder(tok), "", 0
        while i < len(seq):
            step = rnd.randint(1, 4)
            out += decoder.push(seq[i:i + step])
            i += step
        full = tok.decode(seq)
        assert out == full or (full.endswith("\ufffd") and full.startswith(out))

"""``null`` in config.json: an optional key set to null takes the value it has when absent, derived as Hugging
Face's Mistral config derives it (head_dim = hidden / heads, num_key_value_heads = heads); null token ids and
sliding_window keep their meaning; a required key set to null is refused by name."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from trimode.runtime.model.checkpoint import CheckpointError, load_config, load_model, write_random_checkpoint
from trimode.runtime.model.config import ConfigError, ModelConfig, tiny_config
from trimode.runtime.model.network import causal_mask

SHIPPED = Path(__file__).resolve().parents[3] / "models" / "tiny-kjv"
OPTIONAL_KEYS = ["head_dim", "num_key_value_heads", "rope_parameters", "rms_norm_eps", "max_position_embeddings",
                 "block_size", "dtype", "hidden_act", "attention_bias", "mlp_bias", "tie_word_embeddings",
                 "sliding_window", "use_cache", "dlm_paradigm", "auto_map", "architectures"]


def shipped_config() -> dict:
    return json.loads((SHIPPED / "config.json").read_text())


@pytest.mark.parametrize("key", OPTIONAL_KEYS)
def test_null_optional_key_is_the_absent_key(key):
    d = shipped_config()
    absent = {k: v for k, v in d.items() if k != key}
    assert ModelConfig.from_dict({**d, key: None}) == ModelConfig.from_dict(absent)


def test_null_head_dim_and_kv_heads_are_derived_as_hugging_face_does():
    d = {**shipped_config(), "head_dim": None, "num_key_value_heads": None}
    cfg = ModelConfig.from_dict(d)
    assert cfg.head_dim == d["hidden_size"] // d["num_attention_heads"] == 32
    assert cfg.num_key_value_heads == d["num_attention_heads"] == 6  # MistralConfig.__post_init__'s rule
    from transformers import MistralConfig

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "rms_norm_eps", "max_position_embeddings")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = MistralConfig(**{k: d[k] for k in keys}, head_dim=None)
    assert cfg.head_dim == hf.head_dim


@pytest.mark.parametrize("key", ["rope_theta", "factor", "beta_fast", "original_max_position_embeddings"])
def test_null_rope_parameter_is_its_default(key):
    d = shipped_config()
    nulled = {**d, "rope_parameters": {**d["rope_parameters"], key: None}}
    absent = {**d, "rope_parameters": {k: v for k, v in d["rope_parameters"].items() if k != key}}
    assert ModelConfig.from_dict(nulled).rope == ModelConfig.from_dict(absent).rope


def test_null_token_ids_mean_no_such_token():
    cfg = ModelConfig.from_dict({**shipped_config(), "bos_token_id": None, "eos_token_id": None,
                                 "pad_token_id": None})
    assert cfg.bos_token_id is None and cfg.eos_token_ids == () and cfg.extra["pad_token_id"] is None


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "num_attention_heads", "mask_token_id"])
def test_null_required_key_is_refused_by_name(key):
    with pytest.raises(ConfigError, match=rf"required keys \['{key}'\] to null"):
        ModelConfig.from_dict({**shipped_config(), key: None})


@pytest.mark.parametrize("key,value,message", [
    ("rms_norm_eps", "1e-5", "rms_norm_eps must be a positive number"),
    ("max_position_embeddings", 0, "max_position_embeddings must be a positive integer"),
    ("bos_token_id", 5000, "bos_token_id=5000 is outside the vocabulary"),
    ("rope_parameters", "yarn", "rope_parameters must be an object"),
])
def test_wrong_values_are_refused_by_name(key, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**shipped_config(), key: value})


def test_checkpoint_with_null_head_dim_and_kv_heads_loads_and_computes_the_same(tmp_path):
    """A multi-head checkpoint (kv heads = heads, head_dim = hidden / heads) whose config.json says null for both
    loads to the same logits; where the derived values do not fit the weights, the error names the tensors."""
    path = write_random_checkpoint(tmp_path / "mha", tiny_config(num_key_value_heads=4, head_dim=16), seed=2)
    ids = [5, 9, 100, 7]

    def logits():
        model = load_model(path)
        return model.forward_dense(torch.tensor([ids]), torch.arange(len(ids))[None], causal_mask(len(ids)))

    before = logits().detach()
    d = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**d, "head_dim": None, "num_key_value_heads": None}))
    cfg = load_config(path)
    assert (cfg.head_dim, cfg.num_key_value_heads) == (16, 4)
    assert torch.equal(logits().detach(), before)
    gqa = write_random_checkpoint(tmp_path / "gqa", tiny_config(num_key_value_heads=2), seed=2)
    d = json.loads((gqa / "config.json").read_text())
    (gqa / "config.json").write_text(json.dumps({**d, "num_key_value_heads": None}))
    with pytest.raises(CheckpointError, match="k_proj.weight' has shape"):
        load_model(gqa)

"""End and start tokens as ``transformers`` reads them from the same directory: EOS ids are the union of
config.json's and generation_config.json's ``eos_token_id`` (each one id or a list), and a prompt gets the
special tokens of tokenizer.json's post-processor (BOS from a ``TemplateProcessing``), on random checkpoints
and on the shipped tokenizer; generation stops at a generation-config EOS in every mode."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from conftest import make_lm
from trimode.runtime.model.checkpoint import CheckpointError, load_config, load_tokenizer, write_random_checkpoint
from trimode.runtime.model.config import tiny_config

SHIPPED = Path(__file__).resolve().parents[3] / "models" / "tiny-kjv"
TEXTS = ["w5 w6 w7", "w100", "w9 w9 w9 w9 w42 w511", ""]


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("special") / "ckpt", tiny_config(), seed=11)


def _copy(src: Path, dst: Path, config_eos=..., generation_eos=...) -> Path:
    """A copy of ``src`` with config.json's eos_token_id replaced (``...``: kept) and a generation_config.json
    holding ``generation_eos`` (``...``: no file)."""
    shutil.copytree(src, dst)
    if config_eos is not ...:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["eos_token_id"] = config_eos
        (dst / "config.json").write_text(json.dumps(cfg))
    if generation_eos is not ...:
        (dst / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": generation_eos}))
    return dst


def _transformers_eos_union(path: Path) -> set[int]:
    """The EOS ids transformers' GenerationConfig reads from config.json and from generation_config.json."""
    from transformers import GenerationConfig

    def ids(value):
        return set() if value is None else {value} if isinstance(value, int) else set(value)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = ids(GenerationConfig.from_pretrained(path, config_file_name="config.json",
                                                     _from_model_config=True).eos_token_id)
        if (path / "generation_config.json").exists():
            found |= ids(GenerationConfig.from_pretrained(path).eos_token_id)
    return found


@pytest.mark.parametrize("config_eos,generation_eos,expected", [
    (2, [2, 7], (2, 7)),           # the case: an end-of-turn id only generation_config.json declares
    (2, 9, (2, 9)),                # generation_config.json as a single id
    ([2, 5], [7, 2], (2, 5, 7)),   # lists in both, overlapping
    (None, [7, 8], (7, 8)),        # config.json declares none
    (2, None, (2,)),               # generation_config.json's null adds nothing
    (2, ..., (2,)),                # no generation_config.json
])
def test_eos_ids_are_the_union_of_config_and_generation_config(random_ckpt, tmp_path, config_eos, generation_eos,
                                                                expected):
    path = _copy(random_ckpt, tmp_path / "c", config_eos, generation_eos)
    cfg = load_config(path)
    assert cfg.eos_token_ids == expected
    assert set(cfg.eos_token_ids) == _transformers_eos_union(path)


def test_bad_generation_config_is_named(random_ckpt, tmp_path):
    path = _copy(random_ckpt, tmp_path / "c", generation_eos=["</s>"])
    with pytest.raises(CheckpointError, match="generation_config.json: eos_token_id must be an integer"):
        load_config(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 100_000}))
    with pytest.raises(CheckpointError, match="generation_config.json: eos_token_id=100000 is outside the vocab"):
        load_config(path)


@pytest.mark.parametrize("mode", ["ar", "spec", "diffusion"])
def test_generation_stops_at_a_generation_config_eos(random_ckpt, tmp_path, mode):
    """Greedy generation on the same weights: with generation_config.json declaring a token the model emits,
    the output is the plain run's output up to and including that token's first occurrence."""
    prompt = [[7, 19, 250, 31, 5]]

    def run(path):
        lm = make_lm(str(path))
        if mode == "ar":
            return lm.ar_generate(prompt, 16)[0]
        if mode == "spec":
            return lm.linear_spec_generate(prompt, 16, block_length=4)[0]
        return lm.generate(prompt, 16, block_length=4)[0]

    plain = run(random_ckpt)
    eos = set(load_config(random_ckpt).eos_token_ids)
    candidates = [t for t in plain.token_ids[2:] if t not in eos]
    assert candidates, f"the plain run ended before it emitted 3 tokens: {plain.token_ids}"
    stop = candidates[0]
    path = _copy(random_ckpt, tmp_path / "g", generation_eos=[2, stop])
    stopped = run(path)
    end = plain.token_ids.index(stop) + 1
    assert stopped.token_ids == plain.token_ids[:end] and stopped.finish_reason == "stop", \
        (stopped.token_ids, plain.token_ids, stop)


TEMPLATES = {
    "bos": ("<s> $A", [("<s>", 1)]),
    "bos-eos": ("<s> $A </s>", [("<s>", 1), ("</s>", 2)]),
    "eos": ("$A </s>", [("</s>", 2)]),
}


def _with_template(src: Path, dst: Path, template: str | None, **tokenizer_config) -> Path:
    shutil.copytree(src, dst)
    if template is not None:
        backend = HFTokenizer.from_file(str(dst / "tokenizer.json"))
        single, specials = TEMPLATES[template]
        backend.post_processor = processors.TemplateProcessing(single=single, pair=f"{single} $B:1",
                                                               special_tokens=specials)
        backend.save(str(dst / "tokenizer.json"))
    if tokenizer_config:
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        cfg.update(tokenizer_config)
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def _transformers_ids(path: Path, text: str, add_special_tokens: bool = True) -> list[int]:
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(str(path))(text, add_special_tokens=add_special_tokens)["input_ids"]


@pytest.mark.parametrize("template,tokenizer_config", [
    ("bos", {}),                                   # the case: a BOS-adding post-processor
    ("bos-eos", {}),
    ("eos", {}),
    (None, {}),                                    # no post-processor: nothing added
    (None, {"add_bos_token": True, "bos_token": "<s>"}),  # ignored by transformers when tokenizer.json exists
    ("bos", {"add_bos_token": False}),             # likewise: the template wins
])
def test_prompt_special_tokens_match_transformers(random_ckpt, tmp_path, template, tokenizer_config):
    path = _with_template(random_ckpt, tmp_path / "t", template, **tokenizer_config)
    tok = load_tokenizer(path)
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=True) == _transformers_ids(path, text), (template, text)
        assert tok.encode(text) == _transformers_ids(path, text, add_special_tokens=False), (template, text)


def test_shipped_tokenizer_matches_transformers():
    tok = load_tokenizer(SHIPPED)
    for text in ["In the beginning God created the heaven and the earth.", "  Ünïcödé ✓ 日本語\n12 And", "<|eot|>x"]:
        ids = tok.encode(text, add_special_tokens=True)
        assert ids == _transformers_ids(SHIPPED, text)
        assert ids == tok.encode(text)  # its tokenizer.json has no post-processor: nothing added


def test_text_prompts_get_the_bos_token_and_continue_as_the_ids_would(random_ckpt, tmp_path):
    path = _with_template(random_ckpt, tmp_path / "t", "bos")
    lm = make_lm(str(path))
    assert lm.encode("w5 w6 w7") == (1, 5, 6, 7)
    by_text = lm.ar_generate(["w5 w6 w7"], 8)[0]
    by_ids = lm.ar_generate([[1, 5, 6, 7]], 8)[0]
    assert by_text.prompt_ids == [1, 5, 6, 7] and by_text.token_ids == by_ids.token_ids
    assert lm.encode([5, 6, 7]) == (5, 6, 7)  # token-id prompts are taken as given, as transformers does


def test_random_checkpoint_with_several_eos_ids_names_each(tmp_path):
    path = write_random_checkpoint(tmp_path / "c", tiny_config(eos_token_id=(2, 7)), seed=0)
    tok = load_tokenizer(path)
    assert tok.vocab_size == 512 and (tok.token_to_id("</s>"), tok.token_to_id("<|eos_1|>")) == (2, 7)
    assert load_config(path).eos_token_ids == (2, 7)

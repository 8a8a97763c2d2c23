"""The pass-cost profile (``trimode profile``, runtime/profiling.py) on a tiny random checkpoint (torch executor)
and on an engine directory (onnxruntime executor): well-formed JSON with every point asked for, c(T) growing
with T, host shares of every mode, a PNG, and the cache left as it was."""

from __future__ import annotations

import json

import pytest

from build_helpers import finish, start_build
from conftest import make_lm
from trimode.runtime import profiling
from trimode.runtime.cli.main import main

TOKENS = (1, 8, 128)


def check_profile(result: dict, tokens, batches, host_batches) -> None:
    rows = result["passes"]
    for batch in batches:
        assert {(r["kind"], r["num_tokens"]) for r in rows if r["batch"] == batch} == \
            {("decode", 1)} | {(k, t) for k in ("verify", "draft", "denoise") for t in tokens}
    for r in rows:
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"], r
    fastest = {(r["kind"], r["batch"], r["num_tokens"]): r["p10_ms"] for r in rows}
    for batch in batches:
        ratios = result["ratios"][str(batch)]
        assert set(ratios) == {"verify", "draft", "denoise"}
        decode = next(r["median_ms"] for r in rows if r["kind"] == "decode" and r["batch"] == batch)
        for kind, by_t in ratios.items():
            assert set(by_t) == {str(t) for t in tokens}
            for r in rows:
                if r["kind"] == kind and r["batch"] == batch:
                    assert by_t[str(r["num_tokens"])] == pytest.approx(r["median_ms"] / decode)
            # c(T) grows with T: 128 tokens per sequence against 1, compared by the fastest runs (load on a shared
            # machine only ever adds time)
            assert fastest[(kind, batch, max(tokens))] > fastest[(kind, batch, 1)], (batch, kind, by_t)
    assert {(h["mode"], h["batch"]) for h in result["host"]} == \
        {(m, b) for m in profiling.MODES for b in host_batches}
    for h in result["host"]:
        assert h["num_steps"] > 0 and h["num_tokens"] > 0
        assert 0 <= h["host_share"] < 1 and h["forward_ms"] + h["host_ms"] == pytest.approx(h["step_ms"])
    assert result["meta"]["torch_threads"] >= 1 and result["meta"]["device"] == "cpu"


def test_profile_of_a_checkpoint(ckpt, tmp_path, capsys):
    out = tmp_path / "prof"
    code = main(["profile", "--model", ckpt, "--tokens", *map(str, TOKENS), "--batches", "1", "3", "--repeats", "5",
                 "--context-len", "16", "--host-batches", "1", "--host-tokens", "8", "--block-length", "4",
                 "--out", str(out)])
    assert code == 0
    result = json.loads((out / "profile.json").read_text())
    assert result["meta"]["executor"] == "torch" and result["meta"]["source"].startswith("checkpoint")
    check_profile(result, TOKENS, (1, 3), (1,))
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = profiling.PassCostTable.from_json(out / "profile.json")  # the lookup a scheduler would use
    measured = next(r for r in result["passes"] if r["kind"] == "verify" and r["batch"] == 3 and r["num_tokens"] == 8)
    assert table.cost_ms("verify", 3, 8) == measured["median_ms"]
    between = (table.cost_ms("verify", 1, 8), table.cost_ms("verify", 3, 8))
    assert min(between) <= table.cost_ms("verify", 2, 8) <= max(between)
    top = max(t for k, b, t in table.points if k == "draft")
    # beyond what was measured, in proportion to tokens and batch (never cheaper than measured)
    assert table.cost_ms("draft", 6, 4 * top) == pytest.approx(table.cost_ms("draft", 3, top) * 2 * 4)
    assert table.cost_ms("draft", 1, 1) == table.cost_ms("draft", 1, min(TOKENS))  # below: the smallest
    assert table.ratio("verify", 3, 8) == pytest.approx(result["ratios"]["3"]["verify"]["8"])
    with pytest.raises(ValueError, match="no 'prefill' passes"):
        table.cost_ms("prefill", 1, 1)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the last line: a JSON summary
    assert summary["executor"] == "torch" and set(summary["host_share"]) == {"ar b1", "diffusion b1", "spec b1"}


def test_profile_leaves_the_cache_as_it_was_and_refuses_what_cannot_fit(ckpt):
    lm = make_lm(ckpt, num_pages=40)
    before = lm.cache.stats()
    costs = profiling.pass_costs(lm.executor, lm.config.mask_token_id, (1, 4), (2,), repeats=1, warmup=0,
                                 context_len=8)
    assert len(costs) == 1 + 3 * 2 and lm.cache.stats() == before
    with pytest.raises(profiling.ProfileError, match="raise num_pages"):
        profiling.pass_costs(lm.executor, lm.config.mask_token_id, (64,), (16,), repeats=1, context_len=64)
    with pytest.raises(profiling.ProfileError, match="unknown pass kinds"):
        profiling.pass_costs(lm.executor, lm.config.mask_token_id, kinds=("prefill",))
    assert lm.cache.stats() == before


@pytest.mark.slow
def test_profile_of_an_engine_directory(checkpoints, tmp_path):
    engine = tmp_path / "eng"
    finish(start_build(checkpoints["gqa2-yarn-lora"], engine, "none"))
    out = tmp_path / "prof"
    code = main(["profile", "--engine", str(engine), "--tokens", *map(str, TOKENS), "--batches", "2",
                 "--repeats", "5", "--context-len", "16", "--host-batches", "2", "--host-tokens", "8",
                 "--threads", "1", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "profile.json").read_text())
    assert result["meta"]["executor"] == "onnxruntime" and result["meta"]["executor_threads"] == 1
    check_profile(result, TOKENS, (2,), (2,))

"""#6 (onnxruntime part): the onnxruntime executor over an engine directory's reference graphs gives the torch
executor's greedy tokens in every mode, at batch 1 and 4, across a mid-request mode switch; every engine kind
reads and writes the one KV pool in place; the weights are shared by all sessions."""

from __future__ import annotations

import onnx
import pytest

from build_helpers import finish, start_build
from conftest import random_prompts
from trimode.runtime.api import TriModeLM
from trimode.runtime.executors.onnx_executor import OnnxRuntimeExecutor
from trimode.runtime.request import ARConfig, DiffusionConfig, SpecConfig


@pytest.fixture(scope="module")
def engine(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("ortexec") / "eng"
    finish(start_build(checkpoints["gqa2-yarn-lora"], out, "none"))
    return out


def lms(engine):
    return {ex: TriModeLM.from_engine(engine, executor=ex, num_pages=256, **({"threads": 1} if ex == "onnxruntime" else {}))
            for ex in ("torch", "onnxruntime")}


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_tokens_equal_torch_in_every_mode(engine, batch):
    prompts = random_prompts([7, 3, 12, 5][:batch], seed=batch)
    out = {}
    for name, lm in lms(engine).items():
        out[name] = {
            "ar": [r.token_ids for r in lm.ar_generate(prompts, max_new_tokens=10)],
            "diffusion": [r.token_ids for r in lm.generate(prompts, max_new_tokens=8, block_length=4)],
            "spec": [r.token_ids for r in lm.linear_spec_generate(prompts, max_new_tokens=10, block_length=4)],
        }
    assert out["onnxruntime"] == out["torch"]
    assert out["torch"]["spec"] == out["torch"]["ar"]


def test_mode_switch_and_mixed_batch(engine):
    prompts = random_prompts([6, 9, 4], seed=7)
    results = {}
    for name, lm in lms(engine).items():
        reqs = [lm.request(prompts[0], 14, ARConfig(), switches=[(4, SpecConfig(4)), (9, DiffusionConfig(4))]),
                lm.request(prompts[1], 10, SpecConfig(4)),
                lm.request(prompts[2], 8, DiffusionConfig(4))]
        results[name] = [r.token_ids for r in lm.run(reqs)]
    assert results["onnxruntime"] == results["torch"]


def test_one_pool_shared_by_all_kinds_and_equal_to_torch(engine):
    """After spec requests (prefill, draft, verify + rollback) the whole pool equals the torch executor's
    (same pages, same rows; freed pages keep what was written), and it is the runtime's buffer throughout."""
    prompts = random_prompts([5, 11, 3], seed=3)
    caches = {}
    for name, lm in lms(engine).items():
        ptr = lm.cache.k_pool.data_ptr()
        lm.linear_spec_generate(prompts, max_new_tokens=9, block_length=4)
        assert lm.cache.k_pool.data_ptr() == ptr  # written in place, never reallocated
        caches[name] = lm.cache
        if name == "onnxruntime":
            ex = lm.executor
            assert isinstance(ex, OnnxRuntimeExecutor) and set(ex.sessions) == {"prefill", "decode", "draft", "verify"}
            assert set(ex.pool_pointers().values()) == {lm.cache.k_pool[0].data_ptr()}
    ort_cache, torch_cache = caches["onnxruntime"], caches["torch"]
    assert torch_cache.k_pool.abs().sum() > 0
    assert (ort_cache.k_pool - torch_cache.k_pool).abs().max() < 1e-4
    assert (ort_cache.v_pool - torch_cache.v_pool).abs().max() < 1e-4
    assert ((ort_cache.k_pool == 0) == (torch_cache.k_pool == 0)).all()  # the same rows written


def test_weights_are_shared_initializers_over_one_file(engine):
    """Structural: every external initializer of every session is an OrtValue over the one memory-mapped
    weights.bin (so 4 kinds cost the weights once); prepacking, which would copy per session, is off."""
    lm = TriModeLM.from_engine(engine, executor="onnxruntime", num_pages=16, threads=1)
    ex = lm.executor
    mm = ex.shared._maps["weights.bin"]
    lo, hi = mm.ctypes.data, mm.ctypes.data + mm.size
    names = set()
    for kind, s in ex.sessions.items():
        graph = onnx.load(str(engine / "onnx" / f"{kind}.reference.onnx"), load_external_data=False)
        external = {t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        names |= external
        assert external <= set(ex.shared.values)
    assert len(ex.shared.values) == len(names)  # one OrtValue per distinct initializer, whatever the kinds
    for value in ex.shared.values.values():
        assert lo <= value.data_ptr() < hi
    options = next(iter(ex.sessions.values())).session.get_session_options()
    assert options.get_session_config_entry("session.disable_prepacking") == "1"


def test_prepacked_sessions_one_per_graph_same_tokens(engine):
    """prefill, decode and verify compute one graph: one session serves them; with prepacked weights (each
    session's own packed copy) and two intra-op threads the greedy tokens are still the torch executor's."""
    prompts = random_prompts([6, 10], seed=11)
    lm = TriModeLM.from_engine(engine, executor="onnxruntime", num_pages=64, threads=2, prepack=True)
    ex = lm.executor
    assert ex.sessions["prefill"] is ex.sessions["decode"] is ex.sessions["verify"] is not ex.sessions["draft"]
    options = ex.sessions["draft"].session.get_session_options()
    assert options.get_session_config_entry("session.disable_prepacking") == "0"
    assert options.intra_op_num_threads == 2 and ex.threads == 2
    reference = TriModeLM.from_engine(engine, executor="torch", num_pages=64)
    for mode in (ARConfig(), SpecConfig(4), DiffusionConfig(4)):
        got = [r.token_ids for r in lm.run([lm.request(p, 9, mode) for p in prompts])]
        assert got == [r.token_ids for r in reference.run([reference.request(p, 9, mode) for p in prompts])], mode


def test_fused_spec_on_the_reference_graphs(engine):
    """Fused spec runs its chain in the verify graph and its sub-blocks in the draft graph of the same forward
    (the K/V-keeping graph first: docs/kernels.md): the onnxruntime executor gives the torch executor's tokens,
    which are AR's, batched, mixed with other modes and switching in and out of fused spec."""
    from trimode.runtime.request import FusedSpecConfig

    prompts = random_prompts([6, 9, 4, 11], seed=5)
    fused = FusedSpecConfig(4, 2, 2)
    results = {}
    for name, lm in lms(engine).items():
        ar = [r.token_ids for r in lm.ar_generate(prompts, max_new_tokens=14)]
        reqs = [lm.request(prompts[0], 14, fused),
                lm.request(prompts[1], 14, ARConfig(), switches=[(3, fused), (9, SpecConfig(4))]),
                lm.request(prompts[2], 14, fused, switches=[(5, ARConfig()), (10, fused)]),
                lm.request(prompts[3], 14, DiffusionConfig(4))]
        out = lm.run(reqs)
        assert [r.token_ids for r in out[:3]] == ar[:3], name
        assert out[0].forwards["verify"] > 0 and lm.cache.stats().num_free_pages == lm.cache.num_pages
        # greedy tokens are AR's whatever the drafts; the accepted lengths show the drafts themselves agree
        results[name] = [(r.token_ids, r.accepted_lengths, r.fused_fallbacks) for r in out]
    assert results["onnxruntime"] == results["torch"]


def test_fused_step_sub_blocks_read_the_chain_written_in_the_same_forward(engine):
    """One fused step through each executor, with the chain's pool rows poisoned (NaN) beforehand: the chain's
    verify graph must write them before the sub-blocks' draft graph reads them, so every logit is finite and
    onnxruntime's equal torch's."""
    import torch

    from trimode.runtime.passes import PassKind, SeqPass

    prompt = random_prompts([9], seed=2)[0]
    logits = {}
    for name, lm in lms(engine).items():
        cache, mask = lm.cache, lm.config.mask_token_id
        cache.add_sequence(0)
        cache.reserve(0, len(prompt) + 4)
        lm.executor.forward([SeqPass(0, PassKind.PREFILL, tuple(prompt), 0)])
        cache.set_length(0, len(prompt))
        L = len(prompt)
        for pool in (cache.k_pool, cache.v_pool):  # the chain's rows: stale garbage until the chain writes them
            for pos in range(L, L + 4):
                page, row = cache.block_table(0)[pos // cache.page_size], pos % cache.page_size
                pool[:, page, row] = float("nan")
        chain = SeqPass(0, PassKind.VERIFY, (prompt[-1], 5, 6, 7), L, num_logits=4)
        subs = [SeqPass(0, PassKind.DRAFT, (mask, mask), L + i + 1, num_logits=2, use_lora=True) for i in range(2)]
        out = [o.logits for o in lm.executor.forward([subs[1], chain, subs[0]])]  # any order in the list: kept graphs run first
        cache.free(0)
        assert all(bool(torch.isfinite(x).all()) for x in out), name
        logits[name] = out
    for a, b in zip(logits["onnxruntime"], logits["torch"]):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()

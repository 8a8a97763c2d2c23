"""The runtime against an independent full-recompute reference (tests/reference.py), token for token.

1. The runtime's dense forward (``NLDModel.forward_dense``) equals the reference forward, which is written
   from the spec on the raw checkpoint tensors (GQA 1/2/4, default and YaRN RoPE, YaRN attention factor,
   Llama-4 query scaling across ``original_max_position_embeddings``, LoRA rows).
2. ``TriModeLM.ar_generate`` / ``generate`` / ``linear_spec_generate`` (paged cache, batching, mixed
   prompt lengths) emit exactly the reference's greedy tokens; diffusion reports the reference's tokens
   revealed per denoising pass, self-speculation its accepted lengths (the only observable of the draft
   pass and its LoRA, since greedy spec tokens equal AR tokens whatever the drafts are).

The random checkpoints get a "few favourite tokens" head (a handful of head rows scaled up, the rest
down) so that greedy drafts sometimes match the AR tokens (non-trivial acceptance) and tokens repeat
(EOS paths can be exercised with a token that really occurs); the mask id's row is scaled up too, so the
mask is often the raw argmax (selection must skip it; confidences must include it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trimode.runtime.model.checkpoint import load_model, write_random_checkpoint
from trimode.runtime.model.config import RopeConfig, tiny_config

try:  # tests/ may or may not be a package
    from .reference import (block_allowed, causal_allowed, load_reference, ref_ar_generate,
                            ref_diffusion_generate, ref_fused_spec_generate, ref_logits, ref_spec_generate)
except ImportError:
    from reference import (block_allowed, causal_allowed, load_reference, ref_ar_generate,  # type: ignore
                           ref_diffusion_generate, ref_fused_spec_generate, ref_logits, ref_spec_generate)

MAX_NEW = 21            # deliberately not a multiple of any block length
PROMPT_LENGTHS = (3, 7, 12, 5)
NO_EOS = 2              # tiny_config's eos id; the favourite-token head never emits it

VARIANTS = {
    # GQA ratio 1, plain RoPE, no Llama-4 scaling, no adapter
    "gqa1-default": dict(cfg=tiny_config(num_key_value_heads=4,
                                         rope=RopeConfig(rope_type="default", rope_theta=10000.0)),
                         lora_rank=None, max_shard_bytes=None),
    # GQA ratio 2, YaRN, Llama-4 query scaling crossing original_max_position_embeddings=16, LoRA rank 4
    "gqa2-yarn-lora": dict(cfg=tiny_config(rope=RopeConfig(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                           original_max_position_embeddings=16,
                                                           llama_4_scaling_beta=0.1)),
                           lora_rank=4, max_shard_bytes=None),
    # GQA ratio 4, YaRN with an attention factor != 1 (mscale 2 / mscale_all_dim 1), sharded, LoRA rank 4
    "gqa4-yarn-mscale-lora": dict(cfg=tiny_config(num_key_value_heads=1,
                                                  rope=RopeConfig(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                                                                  original_max_position_embeddings=32, mscale=2.0,
                                                                  mscale_all_dim=1.0, llama_4_scaling_beta=0.1)),
                                  lora_rank=4, max_shard_bytes=60_000),
}
MAIN = "gqa2-yarn-lora"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The reference does many tiny matmuls; on 2 shared cores intra-op threads only add contention.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _favourite_token_head(ckpt: Path, mask_token_id: int, num_favourites: int = 6, seed: int = 0) -> None:
    """Scale a few diffusion_head rows up (x3) and the rest down (x0.3), in whichever shard holds the head."""
    index = ckpt / "model.safetensors.index.json"
    fname = json.loads(index.read_text())["weight_map"]["diffusion_head.weight"] if index.exists() \
        else "model.safetensors"
    tensors = load_file(str(ckpt / fname))
    head = tensors["diffusion_head.weight"]
    gen = torch.Generator().manual_seed(seed)
    favourites = torch.randperm(head.shape[0] - 4, generator=gen)[:num_favourites] + 4   # never ids 0..3
    scale = torch.full((head.shape[0], 1), 0.3, dtype=head.dtype)
    scale[favourites] = 3.0
    # the mask id is often the raw argmax: selection must skip it, and confidences include its probability
    scale[mask_token_id] = 3.5
    tensors["diffusion_head.weight"] = (head * scale).contiguous()
    save_file(tensors, str(ckpt / fname), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            v = VARIANTS[name]
            path = tmp_path_factory.mktemp(name)
            write_random_checkpoint(path, v["cfg"], seed=7, lora_rank=v["lora_rank"],
                                    max_shard_bytes=v["max_shard_bytes"])
            _favourite_token_head(path, v["cfg"].mask_token_id)
            cache[name] = path
        return cache[name]
    return get


@pytest.fixture(scope="module")
def reference(checkpoint):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_reference(checkpoint(name))
        return cache[name]
    return get


@pytest.fixture(scope="module")
def runtime_lm(checkpoint):
    cache = {}

    def get(name: str):
        if name not in cache:
            from trimode.runtime.api import TriModeLM
            cache[name] = TriModeLM.from_pretrained(checkpoint(name), page_size=4, num_pages=256)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def reference_ar(reference):
    """Cached ``ref_ar_generate`` (the AR and spec tests both need it)."""
    cache = {}

    def get(name: str, prompt: list[int], eos_ids: list[int]) -> list[int]:
        key = (name, tuple(prompt), tuple(eos_ids))
        if key not in cache:
            weights, cfg = reference(name)
            cache[key] = ref_ar_generate(weights, cfg, prompt, MAX_NEW, eos_ids=eos_ids)
        return cache[key]
    return get


def _prompts(seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 512, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _batch(batch: int) -> list[list[int]]:
    prompts = _prompts()
    return prompts[:1] if batch == 1 else prompts


def _assert_same_tokens(got: list[int], want: list[int], what: str) -> None:
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise AssertionError(f"{what}: first difference at new token {first}\n runtime:   {got}\n reference: {want}")


def _assert_same_reveals(out, revealed: list[int], what: str) -> None:
    """Tokens revealed per denoising pass (the only observable of how a block got its tokens)."""
    got = list(out.revealed_per_step)
    assert got == revealed, f"{what}: revealed per step\n runtime:   {got}\n reference: {revealed}"


def _threshold_kw(policy: str, threshold: float) -> dict:
    """The API takes ``threshold`` only with the threshold policy (the reference ignores it otherwise)."""
    return {"threshold": threshold} if policy == "threshold" else {}


def _check_results(outs, prompts) -> None:
    assert len(outs) == len(prompts)
    for out in outs:
        assert getattr(out, "error", None) is None, f"runtime error: {out.error}"


def _pick_eos(tokens: list[int]) -> int:
    """The token of a greedy output whose first occurrence comes last (so that the EOS stop comes late)."""
    first = {}
    for i, t in enumerate(tokens):
        first.setdefault(t, i)
    return max(first, key=first.get)


# ---- 1. forward -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_matches_runtime(name, checkpoint, reference):
    weights, cfg = reference(name)
    model = load_model(checkpoint(name))
    gen = torch.Generator().manual_seed(1)
    S, C = 48, 36  # 48 positions cross original_max_position_embeddings (16 / 32 / 64)
    ids = torch.randint(0, cfg.vocab_size, (S,), generator=gen).tolist()
    ids[C + 2:] = [cfg.mask_token_id] * (S - C - 2)  # a canvas with masks, as in a denoise pass
    block_rows = torch.zeros(S, dtype=torch.bool)
    block_rows[C:] = True
    cases = {
        "causal": (causal_allowed(S), None, 0),
        "causal, positions from 37": (causal_allowed(S), None, 37),
        "block-bidirectional": (block_allowed(C, S - C), None, 0),
        "block-bidirectional + LoRA rows": (block_allowed(C, S - C), block_rows, 0),
    }
    results = {}
    for case, (allowed, lora_rows, start) in cases.items():
        positions = list(range(start, start + S))
        want = ref_logits(weights, cfg, ids, allowed, lora_rows, positions=positions)
        with torch.no_grad():
            got = model.forward_dense(torch.tensor([ids]), torch.tensor([positions]), allowed,
                                      None if lora_rows is None else lora_rows[None].to(torch.float32))[0]
        err = (got.double() - want).abs()
        tol = 5e-5 + 1e-5 * float(want.abs().max())  # fp32 runtime vs fp64 reference; logits reach ~30 here
        assert err.max() < tol, f"{name} {case}: max |err| {err.max():.3g} (tol {tol:.3g}), mean {err.mean():.3g}"
        results[case] = want
    if weights.has_lora:  # the LoRA case really exercised the adapter, and only on the block rows
        d = (results["block-bidirectional + LoRA rows"] - results["block-bidirectional"]).abs().amax(-1)
        assert d[C:].min() > 1e-3 and d[:C].max() == 0


# ---- 2. AR --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_ar_generate_matches_reference(name, batch, reference_ar, runtime_lm):
    pytest.importorskip("trimode.runtime.api")
    prompts = _batch(batch)
    outs = runtime_lm(name).ar_generate(prompts, max_new_tokens=MAX_NEW, eos_token_ids=[NO_EOS])
    _check_results(outs, prompts)
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        want = reference_ar(name, prompt, [NO_EOS])
        assert len(want) == MAX_NEW
        _assert_same_tokens(list(out.token_ids), want, f"{name} AR prompt {i}")


# ---- 3. block diffusion -------------------------------------------------------------------------------

DIFFUSION_CASES = [
    # (variant, batch, block_length, policy, threshold, max_steps, causal_context)
    *[(MAIN, 4, B, policy, 0.7, None, True) for policy in ("threshold", "topk", "leftmost") for B in (4, 8, 16)],
    (MAIN, 1, 8, "threshold", 0.7, None, True),
    (MAIN, 4, 8, "threshold", 0.95, None, True),
    (MAIN, 4, 8, "topk", 0.7, 3, True),          # fewer steps than masks: 7 masks -> 3, 2, 2
    (MAIN, 4, 8, "threshold", 0.99, 2, True),    # last allowed step reveals everything left
    *[(MAIN, 4, 8, policy, 0.7, None, False) for policy in ("threshold", "topk", "leftmost")],
    (MAIN, 4, 16, "topk", 0.7, 5, False),
    ("gqa1-default", 4, 8, "threshold", 0.7, None, True),
    ("gqa4-yarn-mscale-lora", 4, 8, "threshold", 0.7, None, True),
]


@pytest.mark.parametrize("name,batch,block_length,policy,threshold,max_steps,causal_context", DIFFUSION_CASES)
def test_diffusion_generate_matches_reference(name, batch, block_length, policy, threshold, max_steps,
                                              causal_context, reference, runtime_lm):
    pytest.importorskip("trimode.runtime.api")
    weights, cfg = reference(name)
    prompts = _batch(batch)
    outs = runtime_lm(name).generate(prompts, max_new_tokens=MAX_NEW, block_length=block_length, policy=policy,
                                     max_steps=max_steps, causal_context=causal_context, eos_token_ids=[NO_EOS],
                                     **_threshold_kw(policy, threshold))
    _check_results(outs, prompts)
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        revealed: list[int] = []
        want = ref_diffusion_generate(weights, cfg, prompt, MAX_NEW, block_length, policy, threshold, max_steps,
                                      causal_context, eos_ids=[NO_EOS], revealed_per_step=revealed)
        assert len(want) == MAX_NEW
        what = (f"{name} diffusion B={block_length} {policy} tau={threshold} steps={max_steps} "
                f"causal_context={causal_context} prompt {i}")
        _assert_same_tokens(list(out.token_ids), want, what)
        _assert_same_reveals(out, revealed, what)


# ---- 4. linear self-speculation -----------------------------------------------------------------------

SPEC_CASES = [
    # (variant, batch, block_length, threshold, use_lora)
    *[(MAIN, 4, B, 0.0, lora) for B in (4, 8, 16) for lora in (True, False)],
    (MAIN, 1, 8, 0.0, True),
    (MAIN, 4, 8, 0.7, True),
    ("gqa1-default", 4, 8, 0.0, True),            # no adapter in the checkpoint: use_lora is a no-op
    ("gqa4-yarn-mscale-lora", 4, 8, 0.0, True),
]


@pytest.mark.parametrize("name,batch,block_length,threshold,use_lora", SPEC_CASES)
def test_linear_spec_generate_matches_reference(name, batch, block_length, threshold, use_lora, reference,
                                                reference_ar, runtime_lm):
    pytest.importorskip("trimode.runtime.api")
    weights, cfg = reference(name)
    prompts = _batch(batch)
    outs = runtime_lm(name).linear_spec_generate(prompts, max_new_tokens=MAX_NEW, block_length=block_length,
                                                 threshold=threshold, use_lora=use_lora, eos_token_ids=[NO_EOS])
    _check_results(outs, prompts)
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        want, accepted = ref_spec_generate(weights, cfg, prompt, MAX_NEW, block_length, threshold, use_lora,
                                           eos_ids=[NO_EOS])
        assert want == reference_ar(name, prompt, [NO_EOS])  # the reference itself is lossless
        what = f"{name} spec B={block_length} tau={threshold} lora={use_lora} prompt {i}"
        _assert_same_tokens(list(out.token_ids), want, what)
        assert list(out.accepted_lengths) == accepted, \
            f"{what}: accepted lengths\n runtime:   {list(out.accepted_lengths)}\n reference: {accepted}"


# ---- 5. EOS paths ---------------------------------------------------------------------------------------


def test_eos_paths_match_reference(reference, runtime_lm):
    """An EOS token that really occurs in each mode's greedy output: outputs end right after it (included)."""
    pytest.importorskip("trimode.runtime.api")
    weights, cfg = reference(MAIN)
    lm = runtime_lm(MAIN)
    prompts = _prompts()
    stopped = 0

    # two EOS ids, picked so that rows of one batch finish at different steps (or not at all)
    ar_eos = sorted({_pick_eos(ref_ar_generate(weights, cfg, prompts[i], MAX_NEW)) for i in (0, 3)})
    outs = lm.ar_generate(prompts, max_new_tokens=MAX_NEW, eos_token_ids=ar_eos)
    _check_results(outs, prompts)
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        want = ref_ar_generate(weights, cfg, prompt, MAX_NEW, eos_ids=ar_eos)
        stopped += want[-1] in ar_eos
        _assert_same_tokens(list(out.token_ids), want, f"AR eos={ar_eos} prompt {i}")

    for block_length, policy, causal_context in [(8, "threshold", True), (4, "topk", True),
                                                 (8, "leftmost", False), (16, "threshold", False)]:
        kw = dict(block_length=block_length, policy=policy, causal_context=causal_context, **_threshold_kw(policy, 0.7))
        eos = _pick_eos(ref_diffusion_generate(weights, cfg, prompts[0], MAX_NEW, **kw))
        outs = lm.generate(prompts, max_new_tokens=MAX_NEW, eos_token_ids=[eos], **kw)
        _check_results(outs, prompts)
        for i, (prompt, out) in enumerate(zip(prompts, outs)):
            revealed: list[int] = []
            want = ref_diffusion_generate(weights, cfg, prompt, MAX_NEW, eos_ids=[eos], revealed_per_step=revealed,
                                          **kw)
            stopped += want[-1] == eos
            what = f"diffusion {kw} eos={eos} prompt {i}"
            _assert_same_tokens(list(out.token_ids), want, what)
            _assert_same_reveals(out, revealed, what)  # a block ends at a finished EOS: no further passes

    for block_length in (4, 8):
        outs = lm.linear_spec_generate(prompts, max_new_tokens=MAX_NEW, block_length=block_length, threshold=0.0,
                                       use_lora=True, eos_token_ids=ar_eos)
        _check_results(outs, prompts)
        for i, (prompt, out) in enumerate(zip(prompts, outs)):
            want, accepted = ref_spec_generate(weights, cfg, prompt, MAX_NEW, block_length, eos_ids=ar_eos)
            what = f"spec B={block_length} eos={ar_eos} prompt {i}"
            _assert_same_tokens(list(out.token_ids), want, what)
            # the cycle an EOS cut short may be counted before or after the cut; the others must agree
            got_acc = list(out.accepted_lengths)
            assert got_acc[:-1] == accepted[:-1] and len(got_acc) == len(accepted), \
                f"{what}: accepted lengths\n runtime:   {got_acc}\n reference: {accepted}"
    assert stopped >= 4, "the chosen EOS tokens should stop several of the generations early"


# ---- 6. thinking budget ---------------------------------------------------------------------------------

END_THINK = 0  # an id the favourite-token head never picks: wherever it appears, the budget put it there


def _block_of(what: str) -> int:
    return int(what.split("B=")[1].split()[0])


@pytest.mark.parametrize("budget", [0, 5, 13])
def test_thinking_budget_matches_reference_in_every_mode(budget, reference, runtime_lm):
    """The end-of-thinking token lands exactly at the budget in AR, diffusion (seeded and all-mask canvases)
    and spec (with and without the drafter), batched, as the independent reference places it; greedy spec with
    the budget equals greedy AR with the budget."""
    pytest.importorskip("trimode.runtime.api")
    weights, cfg = reference(MAIN)
    lm = runtime_lm(MAIN)
    prompts = _prompts()
    think = dict(max_thinking_tokens=budget, end_think_token_id=END_THINK, eos_token_ids=[NO_EOS])
    ar = lm.ar_generate(prompts, max_new_tokens=MAX_NEW, **think)
    runs = {"ar": (ar, {}),
            "diffusion B=8": (lm.generate(prompts, max_new_tokens=MAX_NEW, block_length=8, threshold=0.7, **think),
                              dict(block_length=8, threshold=0.7)),
            "diffusion B=4 no-seed": (lm.generate(prompts, max_new_tokens=MAX_NEW, block_length=4, policy="topk",
                                                  causal_context=False, **think),
                                      dict(block_length=4, policy="topk", causal_context=False)),
            "spec B=8": (lm.linear_spec_generate(prompts, max_new_tokens=MAX_NEW, block_length=8, **think), {}),
            "spec B=4 no-lora": (lm.linear_spec_generate(prompts, max_new_tokens=MAX_NEW, block_length=4,
                                                         use_lora=False, **think), {})}
    for what, (outs, kw) in runs.items():
        _check_results(outs, prompts)
        for i, (prompt, out) in enumerate(zip(prompts, outs)):
            got = list(out.token_ids)
            assert got[budget] == END_THINK and END_THINK not in got[:budget], f"{what} prompt {i}: {got}"
            if what == "ar":
                want = ref_ar_generate(weights, cfg, prompt, MAX_NEW, eos_ids=[NO_EOS], thinking=(budget, END_THINK))
            elif what.startswith("diffusion"):
                want = ref_diffusion_generate(weights, cfg, prompt, MAX_NEW, eos_ids=[NO_EOS],
                                              thinking=(budget, END_THINK), **kw)
            else:
                want, _ = ref_spec_generate(weights, cfg, prompt, MAX_NEW, block_length=_block_of(what),
                                            use_lora="no-lora" not in what, eos_ids=[NO_EOS],
                                            thinking=(budget, END_THINK))
                assert got == list(ar[i].token_ids), f"{what} prompt {i}: spec with a budget differs from AR"
            _assert_same_tokens(got, want, f"{what} budget={budget} prompt {i}")


def test_thinking_budget_is_not_forced_after_thinking_ended(reference, runtime_lm):
    """An end-of-thinking token the model produced itself before the budget: nothing is forced (AR and spec
    equal the unconstrained output); a sampled spec run keeps the forced token too."""
    pytest.importorskip("trimode.runtime.api")
    weights, cfg = reference(MAIN)
    lm = runtime_lm(MAIN)
    prompt = _prompts()[1]
    free = list(lm.ar_generate([prompt], max_new_tokens=MAX_NEW, eos_token_ids=[NO_EOS])[0].token_ids)
    natural = free[3]  # ends "thinking" at token 3 by itself
    think = dict(max_thinking_tokens=9, end_think_token_id=natural, eos_token_ids=[NO_EOS])
    assert list(lm.ar_generate([prompt], max_new_tokens=MAX_NEW, **think)[0].token_ids) == free
    assert list(lm.linear_spec_generate([prompt], max_new_tokens=MAX_NEW, block_length=8, **think)[0].token_ids) \
        == free
    sampled = lm.linear_spec_generate([prompt], max_new_tokens=MAX_NEW, block_length=8, temperature=1.0, seed=3,
                                      max_thinking_tokens=6, end_think_token_id=END_THINK,
                                      eos_token_ids=[NO_EOS])[0]
    got = list(sampled.token_ids)
    assert (END_THINK in got[:6]) or got[6] == END_THINK, got


# ---- 7. fused (quadratic) self-speculation ---------------------------------------------------------------

FUSED_CASES = [(name, batch, b, k, bp, lora)
               for name in VARIANTS for batch in (1, 4)
               for b, k, bp in [(4, 1, 4), (8, 4, 8), (16, 16, 8), (8, 8, 3)]
               for lora in (True, False)
               if (name == MAIN or (batch == 4 and lora and b == 8))]


@pytest.mark.parametrize("name,batch,block_length,num_subblocks,subblock_length,use_lora", FUSED_CASES)
def test_fused_spec_matches_reference_and_ar(name, batch, block_length, num_subblocks, subblock_length, use_lora,
                                             reference, reference_ar, runtime_lm):
    """Greedy fused spec: the same tokens, accepted lengths and fallbacks as the dense no-cache reference of the
    quadratic mask, and the same tokens as AR (lossless); the pool holds nothing afterwards."""
    from trimode.runtime.request import FusedSpecConfig

    weights, cfg = reference(name)
    lm = runtime_lm(name)
    prompts = _batch(batch)
    mode = FusedSpecConfig(block_length, num_subblocks, subblock_length, use_lora)
    outs = lm.run([lm.request(p, MAX_NEW, mode, eos_token_ids=[NO_EOS]) for p in prompts])
    _check_results(outs, prompts)
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        want, accepted, fallbacks = ref_fused_spec_generate(weights, cfg, prompt, MAX_NEW, block_length,
                                                            num_subblocks, subblock_length, use_lora,
                                                            eos_ids=[NO_EOS])
        what = f"{name} fused B={block_length} K={num_subblocks} B'={subblock_length} lora={use_lora} prompt {i}"
        assert want == reference_ar(name, prompt, [NO_EOS]), f"{what}: the reference itself is not lossless"
        _assert_same_tokens(list(out.token_ids), want, what)
        assert list(out.accepted_lengths) == accepted and out.fused_fallbacks == fallbacks, what
        assert out.forwards["verify"] == len(accepted) and out.forwards["draft"] >= fallbacks + 1, what
    assert lm.cache.stats().num_free_pages == lm.cache.num_pages

"""Engines that decide: the graphs' decision tail (build/onnx_decisions.py) against the plugins' torch references.

Graphs are built in memory from a tiny random checkpoint; the page pool holds random K/V (the decisions are
checked against the graph's own logits, so any pool will do). The expected decisions come from the same forward
run without deciding (the rows returned as logits) through ``draft_verify_greedy_reference`` /
``confidence_unmask_reference`` one pass at a time, independent of the graph's padding of the decision inputs.
The mask token is chosen as the plain argmax of a row the decisions read, so excluding it changes the answer; the
drafts of a verify pass are the target's own argmaxes, so acceptance runs past the first draft.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from trimode.build.onnx_export import load_weights
from trimode.build.onnx_graph import ModelWeights, build_graph
from trimode.build.plugin_ops import contrib_session, register_onnx_schemas
from trimode.runtime.executors.onnx_executor import graph_feeds
from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.passes import PassKind, SeqPass

PAGE_SIZE = 4
PREFIX_LENGTHS = (5, 11, 2, 7)
DECISIONS = ("accepted", "bonus", "unmask_tokens", "unmask_confidence")


@pytest.fixture(scope="module")
def weights(checkpoints) -> ModelWeights:
    return load_weights(checkpoints["gqa2-yarn-lora"])


@pytest.fixture(scope="module")
def cache(weights) -> PagedKVCache:
    cfg = weights.config
    pool = PagedKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 64, PAGE_SIZE)
    gen = torch.Generator().manual_seed(0)
    pool.k_pool.copy_(torch.randn(pool.k_pool.shape, generator=gen))
    pool.v_pool.copy_(torch.randn(pool.v_pool.shape, generator=gen))
    for s, n in enumerate(PREFIX_LENGTHS):
        pool.add_sequence(s)
        pool.reserve(s, n + 12)
        pool.set_length(s, n)
    return pool


def with_mask(weights: ModelWeights, mask_token_id: int) -> ModelWeights:
    """The same weights with another mask token id (the network's arithmetic does not depend on it)."""
    return dataclasses.replace(weights, config=dataclasses.replace(weights.config, mask_token_id=mask_token_id))


def session(weights: ModelWeights, kind: str, form: str):
    model = build_graph(weights, kind, form, PAGE_SIZE)
    if form == "plugin":
        return contrib_session(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(sess, passes: list[SeqPass], cache: PagedKVCache) -> dict[str, np.ndarray]:
    """The graph's outputs (pools left out) for one forward over ``passes`` (fed as the runtime feeds them)."""
    names = {i.name for i in sess.get_inputs()}
    kind = passes[0].kind
    feeds = graph_feeds(passes, cache, kind.keeps_kv, "lora_mask" in names)
    for layer in range(cache.k_pool.shape[0]):
        feeds[f"k_pool.{layer}"] = cache.k_pool[layer].numpy().copy()
        feeds[f"v_pool.{layer}"] = cache.v_pool[layer].numpy().copy()
    if "is_causal" in names:  # the unified graph
        feeds["is_causal"] = np.array(kind.is_causal)
        feeds.setdefault("slot_mapping", np.full(len(feeds["input_ids"]), -1, np.int64))
        feeds.setdefault("lora_mask", np.zeros(len(feeds["input_ids"]), np.float32))
    outs = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    return {o.name: x for o, x in zip(sess.get_outputs(), outs) if "pool" not in o.name}


def undecided(passes: list[SeqPass]) -> list[SeqPass]:
    """The same passes returning logits: a deciding draft pass returns all its rows."""
    return [dataclasses.replace(p, decide=False, decide_rows=(),
                                num_logits=p.num_logits if p.kind.is_causal else p.num_tokens) for p in passes]


def pass_logits(sess, passes: list[SeqPass], cache: PagedKVCache) -> list[torch.Tensor]:
    """Each pass's logits rows (all rows of a draft pass) from one forward that decides nothing."""
    passes = undecided(passes)
    logits = torch.from_numpy(run(sess, passes, cache)["logits"])
    bounds = np.cumsum([0] + [p.num_logits for p in passes])
    return [logits[a:b] for a, b in itertools.pairwise(bounds)]


def expected(passes: list[SeqPass], logits: list[torch.Tensor], mask_token_id: int) -> dict[str, np.ndarray]:
    """The decisions per the plugins' torch references, pass by pass."""
    # imported here: the kernel modules import Triton, which the plugin tests want loaded after TRITON_INTERPRET
    from trimode.plugins.confidence_unmask import confidence_unmask_reference
    from trimode.plugins.draft_verify import draft_verify_greedy_reference

    accepted, bonus, tokens, confidence = [], [], [], []
    for p, rows in zip(passes, logits):
        if not p.decide:
            continue
        if p.kind.is_causal:
            drafts = torch.tensor(p.token_ids[p.num_tokens - p.num_logits + 1:], dtype=torch.int32)
            num_drafts = torch.tensor([len(drafts)], dtype=torch.int32)
            a, b = draft_verify_greedy_reference(drafts[None], rows[None], num_drafts, mask_token_id)
            accepted.append(int(a[0]))
            bonus.append(int(b[0]))
        else:
            chosen = rows[list(p.decide_rows)]
            t, c = confidence_unmask_reference(chosen, torch.ones(len(chosen), dtype=torch.bool), mask_token_id)
            tokens += t.tolist()
            confidence += c.tolist()
    return {"accepted": np.array(accepted, np.int32), "bonus": np.array(bonus, np.int32),
            "unmask_tokens": np.array(tokens, np.int32), "unmask_confidence": np.array(confidence, np.float32)}


def assert_decisions(got: dict, want: dict, what: str) -> None:
    for name in DECISIONS:
        if name not in got:
            continue
        assert got[name].dtype == want[name].dtype, (what, name, got[name].dtype)
        assert got[name].shape == want[name].shape, (what, name, got[name].shape, want[name].shape)
        if name == "unmask_confidence":
            err = float(np.abs(got[name] - want[name]).max(initial=0.0))
            assert err < 1e-5, f"{what}: max |confidence - reference| = {err:.2e}"
        else:
            assert np.array_equal(got[name], want[name]), (what, name, got[name], want[name])


def masked_argmax(rows: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    x = rows.clone()
    x[..., mask_token_id] = float("-inf")
    return x.argmax(-1)


# ---- the cases: one forward per kind, passes built so that the decisions are not trivial ---------------------------

def verify_case(weights, cache, kind: str):
    """(weights with the chosen mask id, passes, the accepted lengths built in) of a causal forward: pass 0 drafts
    the target's own argmaxes (all accepted), pass 1 one good draft then a wrong one, pass 2 a one-row pass
    (Bd = 1 within a padded batch), pass 3 returns logits. Prefill / decode: one row per pass."""
    vocab = weights.config.vocab_size
    pk = {"prefill": PassKind.PREFILL, "decode": PassKind.DECODE, "verify": PassKind.VERIFY}[kind]
    if kind != "verify":
        lengths = (3, 1, 4, 2) if kind == "prefill" else (1, 1, 1, 1)
        passes = [SeqPass(s, pk, tuple(range(10 + s, 10 + s + n)), PREFIX_LENGTHS[s], 1, decide=s != 3)
                  for s, n in enumerate(lengths)]
        mask = int(pass_logits(session(weights, kind, "reference"), passes, cache)[0][-1].argmax())
        return with_mask(weights, mask), passes, [1, 1, 1]
    sess = session(weights, "verify", "reference")
    seeds = (21, 22, 23, 24)
    tokens = [[seeds[0], 0, 0, 0], [seeds[1], 0, 0], [seeds[2]], [seeds[3], 5]]

    def passes_of(tokens):
        return [SeqPass(s, pk, tuple(t), PREFIX_LENGTHS[s], len(t), decide=s != 3) for s, t in enumerate(tokens)]

    mask = int(pass_logits(sess, passes_of(tokens), cache)[0][0].argmax())  # pass 0's first row: exclusion matters
    for i in range(3):  # row i sees tokens 0..i only: draft i + 1 = the target's choice at row i
        rows = pass_logits(sess, passes_of(tokens), cache)
        tokens[0][i + 1] = int(masked_argmax(rows[0][i], mask))
        if i == 0:
            tokens[1][1] = int(masked_argmax(rows[1][0], mask))
        if i == 1:
            tokens[1][2] = (int(masked_argmax(rows[1][1], mask)) + 1) % vocab
    return with_mask(weights, mask), passes_of(tokens), [4, 2, 1]


def draft_case(weights, cache):
    """A draft forward: passes 0 and 2 decide two and three of their rows (LoRA on for 0), pass 1 returns logits;
    the mask id is the plain argmax of a decided row."""
    passes = [SeqPass(0, PassKind.DRAFT, (30, 3, 3, 3), PREFIX_LENGTHS[0], 4, use_lora=True, decide=True,
                      decide_rows=(1, 3)),
              SeqPass(1, PassKind.DRAFT, (31, 3, 3), PREFIX_LENGTHS[1], 3),
              SeqPass(2, PassKind.DENOISE, (32, 40, 3, 3, 41), PREFIX_LENGTHS[2], 5, decide=True,
                      decide_rows=(0, 2, 3))]
    mask = int(pass_logits(session(weights, "draft", "reference"), passes, cache)[2][2].argmax())
    return with_mask(weights, mask), passes


def kind_case(weights, cache, kind):
    if kind == "draft":
        w, passes = draft_case(weights, cache)
        return w, passes, None
    return verify_case(weights, cache, kind)


KINDS = ("prefill", "decode", "draft", "verify")


@pytest.mark.parametrize("kind", KINDS)
def test_reference_graph_decides_as_the_plugin_references(weights, cache, kind):
    w, passes, accepted = kind_case(weights, cache, kind)
    mask = w.config.mask_token_id
    sess = session(w, kind, "reference")
    logits = pass_logits(sess, passes, cache)
    want = expected(passes, logits, mask)
    got = run(sess, passes, cache)
    assert_decisions(got, want, f"{kind} reference")
    assert got["logits"].shape == (sum(p.num_logits for p in passes if not p.decide), w.config.vocab_size)
    deciding = [rows for p, rows in zip(passes, logits) if p.decide]
    if kind == "draft":
        decided = torch.cat([rows[list(p.decide_rows)] for p, rows in zip(passes, logits) if p.decide])
        assert set(got) >= {"unmask_tokens", "unmask_confidence"} and "accepted" not in got
        assert (decided.argmax(-1) == mask).any(), "the mask id is no row's argmax: exclusion untested"
        assert not (got["unmask_tokens"] == mask).any()
        probs = decided.softmax(-1)  # the confidence is the raw softmax at the token, mask id included
        conf = probs.gather(1, torch.from_numpy(got["unmask_tokens"]).long()[:, None]).squeeze(1)
        assert (conf - torch.from_numpy(got["unmask_confidence"])).abs().max() < 1e-5
    else:
        assert set(got) >= {"accepted", "bonus"} and "unmask_tokens" not in got
        assert got["accepted"].tolist() == accepted, got["accepted"]
        assert deciding[0][0].argmax() == mask and got["bonus"][0] != mask  # the mask id was row 0's argmax
        last = torch.stack([rows[a - 1] for rows, a in zip(deciding, accepted)])
        assert got["bonus"].tolist() == masked_argmax(last, mask).tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_empty_decisions_and_empty_logits(weights, cache, kind):
    """Q = 0 (nothing decides: empty decision outputs) and R = 0 (every pass decides: no logits rows)."""
    w, passes, _ = kind_case(weights, cache, kind)
    sess = session(w, kind, "reference")
    none = run(sess, undecided(passes), cache)
    assert none["logits"].shape[0] == sum(p.num_logits for p in undecided(passes))
    for name in DECISIONS:
        if name in none:
            assert none[name].shape == (0,), (name, none[name].shape)
    every = [dataclasses.replace(p, decide=True, decide_rows=p.decide_rows or tuple(range(p.num_tokens))
                                 if not p.kind.is_causal else ()) for p in passes]
    got = run(sess, every, cache)
    assert got["logits"].shape == (0, w.config.vocab_size)
    assert_decisions(got, expected(every, pass_logits(sess, every, cache), w.config.mask_token_id), f"{kind} all")


def test_decode_graph_with_one_row_passes_only(weights, cache):
    """All passes Bd = 1 (draft_tokens [Nd, 0]): accepted 1 and the bonus is the masked argmax of each row."""
    w, passes, _ = verify_case(weights, cache, "decode")
    sess = session(w, "decode", "reference")
    got = run(sess, passes, cache)
    rows = torch.cat([r for p, r in zip(passes, pass_logits(sess, passes, cache)) if p.decide])
    assert got["accepted"].tolist() == [1, 1, 1]
    assert got["bonus"].tolist() == masked_argmax(rows, w.config.mask_token_id).tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_plugin_graph_decides_as_the_reference_graph(weights, cache, kind):
    """The graph TensorRT gets, run through onnxruntime-extensions with the plugins' torch references: the same
    decisions as the reference graph, for the mixed case and the empty one."""
    register_onnx_schemas()
    w, passes, _ = kind_case(weights, cache, kind)
    onnx.checker.check_model(build_graph(w, kind, "plugin", PAGE_SIZE), full_check=True)
    reference, plugin = session(w, kind, "reference"), session(w, kind, "plugin")
    for case in (passes, undecided(passes)):
        want = run(reference, case, cache)
        got = run(plugin, case, cache)
        assert_decisions(got, want, f"{kind} plugin form")
        assert np.abs(got["logits"] - want["logits"]).max(initial=0.0) < 1e-4


def test_unified_graph_decides_for_every_kind(weights, cache):
    """One graph: a causal forward verifies (its confidence_unmask reads nothing: tokens -1, confidence 0), a draft
    forward unmasks (its draft_verify gets no pass)."""
    register_onnx_schemas()
    for kind in KINDS:
        w, passes, _ = kind_case(weights, cache, kind)
        model = build_graph(w, "unified", "plugin", PAGE_SIZE)
        onnx.checker.check_model(model, full_check=True)
        unified = contrib_session(model)
        got, want = run(unified, passes, cache), run(session(w, kind, "reference"), passes, cache)
        q = sum(p.num_logits if p.kind.is_causal else len(p.decide_rows) for p in passes if p.decide)
        if kind == "draft":
            assert got["accepted"].shape == (0,) and got["bonus"].shape == (0,)
            assert_decisions({k: got[k] for k in ("unmask_tokens", "unmask_confidence")}, want, "unified draft")
        else:
            assert_decisions({k: got[k] for k in ("accepted", "bonus")}, want, f"unified {kind}")
            assert got["unmask_tokens"].tolist() == [-1] * q and got["unmask_confidence"].tolist() == [0.0] * q


def test_tensor_parallel_graphs_do_not_decide(weights):
    """A --tp rank holds a vocabulary slice: its graphs take no decision inputs and return logits only."""
    from trimode.build.sharding import shard_weights

    model = build_graph(shard_weights(weights, 0, 2), "verify", "reference", PAGE_SIZE)
    names = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    assert not names & {"decide_index", "verify_gather", "draft_tokens", "draft_lens", *DECISIONS}


def tail_only_session(form: str, vocab: int, mask_token_id: int):
    """The verify and unmask tails alone, on a graph input ``dec_logits`` [Q, V] (no model), for crafted logits."""
    from onnx import TensorProto, helper

    from trimode.build import onnx_decisions as tail
    from trimode.build.onnx_graph import OPSET, _Graph

    g = _Graph()
    (tail._plugin_verify if form == "plugin" else tail._reference_verify)(g, "dec_logits", vocab, mask_token_id)
    tail._reference_unmask(g, "dec_logits", vocab, mask_token_id)
    inputs, outputs = tail.decision_io("unified", None)
    inputs = [helper.make_tensor_value_info("dec_logits", TensorProto.FLOAT, ["Q", vocab]), *inputs[1:]]
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("trimode", 1)] if form == "plugin" else [])
    model = helper.make_model(helper.make_graph(g.nodes, "tail", inputs, outputs, list(g.inits.values())),
                              opset_imports=opsets)
    if form == "plugin":
        register_onnx_schemas()
        return contrib_session(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("form", ["reference", "plugin"])
def test_decision_tail_on_crafted_logits(form):
    """Ties go to the lowest id; the mask id never wins, yet its logit counts in the confidence; a draft past
    draft_lens is not accepted even when it matches; Nd = 0 and Bd = 1 (draft_tokens [Nd, 0]) work."""
    from trimode.plugins.draft_verify import draft_verify_greedy_reference

    vocab, mask = 8, 2
    sess = tail_only_session(form, vocab, mask)
    x = torch.full((5, vocab), -1.0)
    x[0, [2, 5, 6]] = torch.tensor([9.0, 4.0, 4.0])  # the mask is the max; 5 and 6 tie -> 5
    x[1, [1, 7]] = 3.0  # tie -> 1
    x[2, 4] = 2.0
    x[3, 0] = 5.0
    x[4, [3, 2]] = torch.tensor([1.0, 1.0])  # the mask ties with 3 -> 3
    logits = x.numpy()
    cases = [  # (verify_gather, draft_tokens, draft_lens, accepted, bonus)
        ([0, 1, 2, 3], [[5, 1, 4]], [3], [4], [0]),  # every draft accepted
        ([0, 1, 2, 2, 3, 4, 4, 4], [[5, 1, 0], [0, 3, -1]], [3, 1], [3, 2], [4, 3]),  # 0 != 4; 3 is padding
        ([0, 1, 2, 3], [[5, 1, 4]], [1], [2], [1]),  # drafts 2 and 3 match but lie past draft_lens
        ([0, 1], [[6]], [1], [1], [5]),  # 6 loses the tie to 5
        ([3, 4], np.zeros((2, 0)), [0, 0], [1, 1], [0, 3]),  # Bd = 1
        ([], np.zeros((0, 0)), [], [], []),  # Nd = 0
    ]
    for gather, drafts, lens, accepted, bonus in cases:
        feeds = {"dec_logits": logits, "verify_gather": np.array(gather, np.int64),
                 "draft_tokens": np.array(drafts, np.int32).reshape(len(lens), -1 if len(lens) else 0),
                 "draft_lens": np.array(lens, np.int32)}
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        assert got["accepted"].tolist() == accepted and got["bonus"].tolist() == bonus, (gather, drafts, lens, got)
        target = torch.from_numpy(logits[gather]).reshape(len(lens), feeds["draft_tokens"].shape[1] + 1, vocab)
        want = draft_verify_greedy_reference(torch.from_numpy(feeds["draft_tokens"]), target,
                                             torch.from_numpy(feeds["draft_lens"]), mask)
        assert [w.tolist() for w in want] == [accepted, bonus]
    assert got["unmask_tokens"].tolist() == [5, 1, 4, 0, 3]
    probs = x.softmax(-1)  # raw logits: the mask's 9.0 makes row 0's confidence small
    assert np.allclose(got["unmask_confidence"], probs[torch.arange(5), [5, 1, 4, 0, 3]].numpy(), atol=1e-6)
    empty = sess.run(None, {"dec_logits": np.zeros((0, vocab), np.float32), "verify_gather": np.zeros(0, np.int64),
                            "draft_tokens": np.zeros((0, 0), np.int32), "draft_lens": np.zeros(0, np.int32)})
    assert [e.shape for e in empty] == [(0,)] * 4


# ---- TensorRT-RTX: the real builder, on CPU ----------------------------------------------------------------------

@pytest.mark.slow
def test_tensorrt_rtx_builds_the_deciding_graphs(checkpoints, tmp_path):
    """The plugin graphs with the decision tails, per kind and unified, built for SM121 by TensorRT-RTX with the
    build's optimization profiles (every decision input and logits_index from 0; draft_tokens 0 wide for decode
    and draft); in a child process, the parsed networks keep the decision plugins and their output types."""
    from trimode.build.onnx_export import export_graphs
    from trimode.build.trt_compile import build_engines, tensorrt_status
    from trimode.plugins import tensorrt_libs

    usable, why = tensorrt_status("spark")
    if not usable:
        pytest.skip(f"TensorRT-RTX cannot build here: {why}")
    cfg = load_weights(checkpoints["gqa2-yarn-lora"]).config
    kinds = list(KINDS)
    export_graphs(checkpoints["gqa2-yarn-lora"], tmp_path / "onnx", kinds, PAGE_SIZE, progress=lambda msg: None)
    shapes = {"max_batch": 4, "max_seq": 64, "block_length": 8, "page_size": PAGE_SIZE, "max_pages_total": 64,
              "num_layers": cfg.num_hidden_layers, "num_kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim}
    for layout in ("shared", "per-kind"):
        section = build_engines(tmp_path / "onnx", tmp_path / layout, kinds, shapes, cfg.num_hidden_layers, layout,
                                target="spark")
        assert set(section["engines"]) == set(kinds) and all(p["bytes"] > 0 for p in section["plans"].values())
    env = tensorrt_libs.child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(tmp_path / "onnx"), json.dumps(shapes)],
                       capture_output=True, text=True, timeout=300, env=env, check=False)
    assert r.returncode == 0, f"child failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    report = json.loads(r.stdout.strip().splitlines()[-1])
    causal = {"accepted": "INT32", "bonus": "INT32"}
    unmask = {"unmask_tokens": "INT32", "unmask_confidence": "FLOAT"}
    for graph, plugins, outputs in (("prefill", ["draft_verify"], causal), ("decode", ["draft_verify"], causal),
                                    ("verify", ["draft_verify"], causal), ("draft", ["confidence_unmask"], unmask),
                                    ("unified", ["confidence_unmask", "draft_verify"], {**causal, **unmask})):
        assert report[graph]["decision_plugins"] == plugins, (graph, report[graph])
        assert {k: v for k, v in report[graph]["outputs"].items() if k in DECISIONS} == outputs, report[graph]
    assert report["decode"]["profiles"][0]["draft_tokens"] == [[0, 0], [2, 0], [4, 0]]
    assert report["unified"]["profiles"][2]["draft_tokens"] == [[0, 0], [0, 0], [0, 0]]  # the draft kind
    assert report["verify"]["profiles"][0]["decide_index"] == [[0], [16], [36]]
    assert [p["logits_index"][0] for p in report["unified"]["profiles"]] == [[0]] * 4


def inspect_with_tensorrt_rtx(onnx_dir: str, shapes_json: str) -> dict:
    """Child process: parse each plugin graph (wired kv-first, as the build does), read back each kind's
    optimization profile as TensorRT holds it, list the decision plugin layers and the output types."""
    import onnx as onnx_module

    from trimode.build.trt_compile import profile_shapes, wire_kv_first
    from trimode.plugins import tensorrt_libs, trt_plugins

    trt = tensorrt_libs.import_tensorrt("tensorrt-rtx")
    trt_plugins.register(trt)
    shapes = json.loads(shapes_json)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    report = {}
    for graph in (*KINDS, "unified"):
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        path = Path(onnx_dir) / f"{graph}.plugin.onnx"
        model = wire_kv_first(onnx_module.load(str(path), load_external_data=False))
        assert parser.parse(model.SerializeToString(), str(path)), [str(parser.get_error(k))
                                                                     for k in range(parser.num_errors)]
        config = builder.create_builder_config()
        profiles = []
        for kind in (KINDS if graph == "unified" else (graph,)):
            profile = builder.create_optimization_profile()
            wanted = profile_shapes(kind, shapes, shapes["num_layers"])
            inputs = [network.get_input(k).name for k in range(network.num_inputs)]
            for name in inputs:
                if name in wanted:
                    profile.set_shape(name, *wanted[name])
            assert config.add_optimization_profile(profile) >= 0, (graph, kind)
            profiles.append({name: [list(d) for d in profile.get_shape(name)] for name in inputs if name in wanted})
        layers = [network.get_layer(k) for k in range(network.num_layers)]
        plugins = sorted(layer.name for layer in layers
                         if layer.type.name.startswith("PLUGIN") and layer.name.startswith(("draft_", "confidence_")))
        report[graph] = {"decision_plugins": plugins, "profiles": profiles,
                         "outputs": {network.get_output(k).name: network.get_output(k).dtype.name
                                     for k in range(network.num_outputs)}}
    return report


if __name__ == "__main__":
    print(json.dumps(inspect_with_tensorrt_rtx(*sys.argv[1:3])))

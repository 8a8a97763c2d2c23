"""#5 graph export (recipe none, fp32): reference-form graphs run by onnxruntime against the torch runtime,
plugin-form graphs through onnx.checker with the expected plugin nodes and attributes, and the plugin-form
graphs themselves executed through onnxruntime-extensions with the plugins' torch references."""

from __future__ import annotations

import json

import onnx
import pytest

from build_helpers import finish, start_build
from graph_checks import compare_kinds, filled_cache, kind_passes, plugin_nodes, run_graph, torch_reference
from trimode.build.plugin_ops import contrib_session, register_onnx_schemas
from trimode.runtime.model.checkpoint import load_model

VARIANTS = ("gqa2-yarn-lora", "gqa4-yarn-qscale")  # GQA 2 and 4, YaRN, Llama-4 query scaling, LoRA ranks 4 / 8


@pytest.fixture(scope="module")
def engines(checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    procs = {v: start_build(checkpoints[v], tmp / v, "none") for v in VARIANTS}
    for p in procs.values():
        finish(p)
    return {v: tmp / v for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_graphs_match_torch_runtime(engines, checkpoints, variant):
    """Every kind, with a pool holding three sequences of 5, 11 and 2 tokens (page size 4): logits and the
    written pool within 1e-4 of the torch runtime."""
    errors = compare_kinds(engines[variant], load_model(checkpoints[variant]))
    assert set(errors) == {"prefill", "decode", "draft", "verify"}
    for kind, (logit_err, pool_err, *_) in errors.items():
        assert logit_err < 1e-4, f"{variant} {kind}: max |logits - torch| = {logit_err:.2e}"
        assert pool_err < 1e-4, f"{variant} {kind}: max |pool - torch pool| = {pool_err:.2e}"


def test_plugin_graphs_pass_checker_with_plugin_nodes(engines, checkpoints):
    register_onnx_schemas()
    engine = engines["gqa2-yarn-lora"]
    manifest = json.loads((engine / "manifest.json").read_text())
    num_layers = load_model(checkpoints["gqa2-yarn-lora"]).config.num_hidden_layers
    for kind, files in manifest["engine_kinds"].items():
        path = engine / "onnx" / files["plugin"]
        onnx.checker.check_model(str(path), full_check=True)
        nodes = plugin_nodes(path)
        attention = [n for n in nodes if n.op_type == "paged_attention"]
        append = [n for n in nodes if n.op_type == "kv_append"]
        assert len(attention) == num_layers
        assert len(append) == (0 if kind == "draft" else num_layers)
        for node in attention:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["is_causal"] == (0 if kind == "draft" else 1)
            assert attrs["page_size"] == 4 and attrs["scale"] == pytest.approx(16 ** -0.5)
            assert attrs["plugin_namespace"] == b"trimode" and attrs["plugin_version"] == b"1"
            assert list(node.input)[3:] == [f"k_pool.{node.name.split('_')[-1]}", f"v_pool.{node.name.split('_')[-1]}",
                                            "block_tables", "context_lens", "query_start"]
        for node in append:
            assert list(node.input)[-1] == "slot_mapping" and len(node.output) == 2
        inputs = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
        assert ("lora_mask" in inputs) == (kind == "draft") and ("slot_mapping" in inputs) == (kind != "draft")
    unified = engine / "onnx" / manifest["unified_graph"]
    onnx.checker.check_model(str(unified), full_check=True)
    kinds = sorted({dict((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute)["is_causal"]
                    for n in plugin_nodes(unified) if n.op_type == "paged_attention"})
    assert kinds == [0, 1]


def test_weights_are_stored_once_for_all_graphs(engines):
    onnx_dir = engines["gqa2-yarn-lora"] / "onnx"
    graphs = sorted(onnx_dir.glob("*.onnx"))
    assert len(graphs) == 9  # 4 kinds x 2 forms + unified
    for g in graphs:
        model = onnx.load(str(g), load_external_data=False)
        big = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert big and all({e.key: e.value for e in t.external_data}["location"] == "weights.bin" for t in big)
        assert g.stat().st_size < 64 << 10  # graph files hold structure, not weights


@pytest.mark.slow
def test_plugin_form_graphs_compute_the_torch_result(engines, checkpoints):
    """The graphs TensorRT gets (plugin nodes, and the unified If graph) run through onnxruntime-extensions with
    the plugins' torch references: the same numbers as the torch runtime."""
    engine = engines["gqa2-yarn-lora"]
    model = load_model(checkpoints["gqa2-yarn-lora"])

    def session(path):
        return contrib_session(onnx.load(str(path)))

    errors = compare_kinds(engine, model, "plugin", session_factory=session)
    for kind, (logit_err, pool_err, *_) in errors.items():
        assert logit_err < 1e-4 and pool_err < 1e-4, (kind, logit_err, pool_err)
    # the unified graph: every kind through one graph (is_causal input, slot -1 = not written)
    unified = engine / "onnx" / json.loads((engine / "manifest.json").read_text())["unified_graph"]
    cache, ex = filled_cache(model, 4)
    sess = session(unified)
    for kind in ("prefill", "decode", "draft", "verify"):
        passes = kind_passes(kind, model.config.vocab_size)
        want, want_pool = torch_reference(ex, passes)
        got, pool = run_graph(unified, passes, cache, sess)
        assert (got - want).abs().max() < 1e-4, kind
        if kind == "draft":
            assert (pool - cache.k_pool).abs().max() == 0, "a draft pass must leave the pool bit-identical"
        else:
            assert (pool - want_pool).abs().max() < 1e-4, kind

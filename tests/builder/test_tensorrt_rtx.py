"""Real TensorRT engines on a CPU-only machine: the TensorRT stage with TensorRT-RTX (its builder needs no GPU).

``scripts/build_engine.py --target spark`` builds every recipe (none / fp8 / fp8-kv / w4a16) end to end; the
``rtx`` target (SM86, SM89, SM120, SM121) and the ``per-kind`` layout are built from the same graphs; the
builder's refusal of FP8 on SM86 becomes a one-line error naming target and recipe; the plans' headers name the
targets asked for; INT4 weights stay INT4 in the plan; the kv-first wiring is what makes the in-place
``kv_append`` build; the loader trap gets a clear error instead of an abort; the plugin classes' build logic runs
against the real registry; the manifest is refused by a runtime of another flavour, version or GPU; the
TensorRT executor's work up to the execution call (plan selection, header checks, feeds within each kind's
profile, pool addresses) runs against the real plans.

Not run here: deserializing and executing a plan (needs an RTX-class GPU or a DGX Spark: ``python
scripts/verify_engine.py --engine DIR`` on such a machine) and TensorRT 11 (not installable from PyPI; its path
is tested against tests/fake_tensorrt.py in test_build_engine_dir.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from build_helpers import SHIPPED, finish, random_text, start_build, tame_random_checkpoint
from trimode.build.trt_compile import EngineBuildError, build_engines, tensorrt_status, wire_kv_first
from trimode.plugins import tensorrt_libs
from trimode.runtime.executors.engine_dir import EngineMismatch, check_engine_dir, check_tensorrt, read_manifest

USABLE, WHY = tensorrt_status("spark")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not USABLE, reason=f"TensorRT-RTX cannot build here: {WHY}")]
RECIPES = ("none", "fp8", "fp8-kv", "w4a16")
RTX = ["SM86", "SM89", "SM120", "SM121"]
KINDS = ["prefill", "decode", "draft", "verify"]


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    """Four --target spark engine directories of one tame random checkpoint, built concurrently."""
    tmp = tmp_path_factory.mktemp("spark")
    model = tame_random_checkpoint(tmp / "source")
    procs = {r: start_build(model, tmp / f"spark-{r}", r, "--target", "spark", calib_text=random_text(3000, 1))
             for r in RECIPES}
    if (SHIPPED / "config.json").is_file():  # tiny-kjv, fp32 and w4a16, decode plans alone (INT4 weights kept?)
        for r in ("none", "w4a16"):
            procs[f"kjv-{r}"] = start_build(SHIPPED, tmp / f"kjv-{r}", r, "--target", "spark", "--modes", "ar",
                                            "--layout", "per-kind", "--page-size", "16", "--calib-samples", "4",
                                            "--calib-seq-len", "32")
    logs = {r: finish(p) for r, p in procs.items()}
    return {"model": model, "tmp": tmp, "logs": logs, **{r: tmp / f"spark-{r}" for r in RECIPES},
            **{name: tmp / name for name in procs if name.startswith("kjv-")}}


def rebuild(engine_dir: Path, out: Path, target: str, layout: str = "shared", kinds=None) -> dict:
    m = read_manifest(engine_dir)
    return build_engines(engine_dir / "onnx", out, kinds or list(m["engine_kinds"]), m["shapes"],
                         m["shapes"]["num_layers"], layout, target=target, recipe=m["recipe"]["name"])


def test_spark_builds_every_recipe_with_tensorrt_rtx(spark):
    version = tensorrt_libs.flavour_version("tensorrt-rtx")
    for recipe in RECIPES:
        m = check_engine_dir(spark[recipe], verify_hashes="all")
        section = m["tensorrt"]
        assert m["stage"] == "tensorrt" and m["recipe"]["name"] == recipe
        assert section["flavour"] == "tensorrt-rtx" and section["version"] == version
        assert section["compute_capabilities"] == ["SM121"] and section["layout"] == "shared"
        assert section["engines"] == {k: {"plan": "trt/engine.plan", "profile": i} for i, k in enumerate(KINDS)}
        data = (spark[recipe] / "trt" / "engine.plan").read_bytes()
        assert data[:4] == b"vtrt" and data[0x20] == 0b100000, (recipe, data[0x20])  # bit 5: SM121 only
        header = tensorrt_libs.rtx_plan_header(data)
        assert header["targets"] == ["SM121"] and version.startswith(header["version"] + ".")
        assert "trt/engine.plan" in m["files"] and m["files"]["trt/engine.plan"]["bytes"] == len(data)
        assert "TensorRT-RTX" in spark["logs"][recipe][1] and "error" not in spark["logs"][recipe][1].lower()


def test_unified_graph_has_plugins_inside_if_and_builds(spark):
    graph = onnx.load(str(spark["none"] / "onnx" / "unified.plugin.onnx"), load_external_data=False).graph
    branches = [n for n in graph.node if n.op_type == "If"]
    assert branches and all(a.g.node[0].op_type == "paged_attention" for n in branches for a in n.attribute)
    assert (spark["none"] / "trt" / "engine.plan").stat().st_size > 0


def test_rtx_target_portable_plans_and_the_per_kind_layout(spark, tmp_path):
    for recipe in ("none", "w4a16"):
        section = rebuild(spark[recipe], tmp_path / recipe, "rtx", "per-kind")
        assert section["compute_capabilities"] == RTX and section["layout"] == "per-kind"
        assert {k: v["plan"] for k, v in section["engines"].items()} == {k: f"trt/{k}.plan" for k in KINDS}
        for kind in KINDS:
            data = (tmp_path / recipe / f"{kind}.plan").read_bytes()
            assert data[0x20] == 0b111100 and tensorrt_libs.rtx_plan_header(data)["targets"] == RTX
            assert section["plans"][f"trt/{kind}.plan"]["header_targets"] == RTX


@pytest.mark.parametrize("recipe", ["fp8", "fp8-kv"])
def test_rtx_refuses_fp8_naming_target_and_recipe(spark, tmp_path, recipe):
    """SM86 (in --target rtx) has no FP8: the builder refuses, and the error is one line naming both."""
    with pytest.raises(EngineBuildError) as e:
        rebuild(spark[recipe], tmp_path / "trt", "rtx", kinds=["decode"])
    msg = str(e.value)
    assert "--target rtx" in msg and f"--quant {recipe}" in msg and "SM86" in msg and "\n" not in msg, msg
    assert "refused to build engine.plan" in msg


def test_fp8_for_rtx_fails_the_build_with_one_line_and_leaves_no_engine(spark, tmp_path):
    out = tmp_path / "rtx-fp8"
    proc = start_build(spark["model"], out, "fp8", "--target", "rtx", "--modes", "ar",
                       calib_text=random_text(3000, 1))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--target rtx" in last and "--quant fp8" in last, last
    assert not (out / "manifest.json").exists()


def test_w4a16_plan_keeps_int4_weights(spark):
    """tiny-kjv's decode plans for --target spark: the w4a16 plan is smaller than the fp32 one by at least 3/4 of
    what the graph's weights shrink (fp32 -> packed INT4 + group scales; embedding and head stay 16-bit); were
    the weights dequantized into the plan, the two would be about the same size. (Measured: 4.8 of 5.3 MB.)"""
    if "kjv-none" not in spark:
        pytest.skip("models/tiny-kjv is not shipped in this checkout")
    sizes = {r: (spark[f"kjv-{r}"] / "trt" / "decode.plan").stat().st_size for r in ("none", "w4a16")}
    weights = {r: (spark[f"kjv-{r}"] / "onnx" / "weights.bin").stat().st_size for r in ("none", "w4a16")}
    saved, expected = sizes["none"] - sizes["w4a16"], weights["none"] - weights["w4a16"]
    assert expected > 4e6 and saved >= 0.75 * expected, (sizes, weights)
    assert read_manifest(spark["kjv-w4a16"])["tensorrt"]["plans"]["trt/decode.plan"]["header_targets"] == ["SM121"]


def test_kv_first_wiring_is_what_lets_kv_append_alias_the_pool(spark, tmp_path):
    """wire_kv_first: nothing but kv_append reads a pool input, attention reads kv_append's output pool. The graph
    as exported (attention reading the pool input too) does not build with the aliased kv_append."""
    src = spark["none"] / "onnx" / "decode.plugin.onnx"
    model = wire_kv_first(onnx.load(str(src), load_external_data=False))
    readers = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            readers.setdefault(name, []).append((i, node.op_type))
    layers = read_manifest(spark["none"])["shapes"]["num_layers"]
    for layer in range(layers):
        assert [op for _, op in readers[f"k_pool.{layer}"]] == ["kv_append"]
        (append_at, _), = readers[f"k_pool.{layer}"]
        assert [op for _, op in readers[f"k_pool_out.{layer}"]] == ["paged_attention"]
        assert readers[f"k_pool_out.{layer}"][0][0] > append_at  # topological order kept
    script = f"""
import json, onnx, sys
from pathlib import Path
from trimode.build import trt_compile
trt_compile.wire_kv_first = lambda model: model  # the graph as exported
m = json.load(open({str(spark['none'] / 'manifest.json')!r}))
try:
    trt_compile._build({str(spark['none'] / 'onnx')!r}, {str(tmp_path / 'unwired')!r}, ["decode"], m["shapes"],
                       m["shapes"]["num_layers"], "per-kind", 1.0, "trt/", 1, "spark", "none")
except trt_compile.EngineBuildError as e:
    print("REFUSED", e)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=tensorrt_libs.child_env())
    assert "REFUSED" in r.stdout and "hasValidProfileData" in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])


def test_the_loader_trap_gets_a_clear_error_not_an_abort(spark, tmp_path):
    """In a process started without libtensorrt_rtx.so on its loader path the parser would abort at the first
    plugin node: the in-process build refuses first; build_engines runs the stage in a child with the path."""
    assert not tensorrt_libs.loader_ready()  # the test process: the builds above went through a child process
    script = f"""
import json
from trimode.build import trt_compile
from trimode.plugins import tensorrt_libs
m = json.load(open({str(spark['none'] / 'manifest.json')!r}))
try:
    trt_compile._build({str(spark['none'] / 'onnx')!r}, {str(tmp_path / 'x')!r}, ["decode"], m["shapes"],
                       m["shapes"]["num_layers"], "per-kind", 1.0, "trt/", 1, "spark", "none")
except tensorrt_libs.LoaderPathError as e:
    print("CLEAR", e)
"""
    env = {k: v for k, v in tensorrt_libs.child_env().items() if k != "LD_LIBRARY_PATH"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "CLEAR" in r.stdout and "LD_LIBRARY_PATH=" in r.stdout, (r.stdout, r.stderr)
    ready = subprocess.run([sys.executable, "-c", "from trimode.plugins import tensorrt_libs as t; "
                            "print(t.loader_ready())"], capture_output=True, text=True,
                           env=tensorrt_libs.child_env())
    assert ready.stdout.strip() == "True", ready.stderr
    link = tensorrt_libs.link_dir() / "libtensorrt_rtx.so"
    assert link.is_symlink() and link.resolve().name.startswith("libtensorrt_rtx.so.")


def in_child(check: str, *args: str) -> dict:
    """Run ``check`` of this file in a child interpreter started with libtensorrt_rtx.so on its loader path; its
    last stdout line is JSON. (TensorRT-RTX is never loaded into the test process, which runs onnxruntime too:
    see ``tensorrt_libs.flavour_available``.)"""
    env = tensorrt_libs.child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), check, *args], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, f"{check} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_plugin_creators_build_logic_on_the_real_registry():
    """The IPluginV3 creators registered with TensorRT-RTX's registry: fields in, fields out (what a plan
    stores), kv_append's outputs aliased to its pool inputs, output types (checked in check_plugins)."""
    report = in_child("plugins")
    assert report["creators"] == ["confidence_unmask", "draft_verify", "draft_verify_sampling", "kv_append",
                                  "paged_attention"]
    assert report["attention_attrs"] == {"is_causal": 0, "scale": 0.125, "page_size": 16}
    assert report["round_trip"] and report["kv_append_aliases"] == [2, 3] and report["attention_aliases"] == [-1]
    assert "trimode::draft_verify plugin: missing field(s) ['mask_token_id']" in report["missing_field"]


def test_decision_plugins_build_inside_a_graph():
    """draft_verify (greedy and sampling) and confidence_unmask as plugin nodes at the end of a graph (the form the
    verify / draft graphs take when the engines decide): parsed and built for SM121 with dynamic batch shapes."""
    report = in_child("decide")
    assert report["built"] and report["targets"] == ["SM121"], report
    assert report["outputs"] == {"accepted": "INT32", "bonus": "INT32", "s_accepted": "INT32", "s_bonus": "INT32",
                                 "tokens": "INT32", "confidence": "FLOAT"}


def test_runtime_refuses_another_flavour_version_or_gpu(spark):
    m = read_manifest(spark["none"])
    version = m["tensorrt"]["version"]
    assert check_tensorrt(m, spark["none"], flavour="tensorrt-rtx", version=version, compute_capability="SM121")
    cases = [(dict(flavour="tensorrt", version=version), "tensorrt.flavour is 'tensorrt-rtx'", "'tensorrt'"),
             (dict(flavour="tensorrt-rtx", version="1.8.0.20"), f"tensorrt.version is '{version}'", "'1.8.0.20'"),
             (dict(flavour="tensorrt-rtx", version=version, compute_capability="SM89"),
              "tensorrt.compute_capabilities is ['SM121']", "'SM89'")]
    for kwargs, built, wanted in cases:
        with pytest.raises(EngineMismatch) as e:
            check_tensorrt(m, spark["none"], **kwargs)
        assert built in str(e.value) and wanted in str(e.value), str(e.value)


def test_executor_up_to_the_execution_call(spark, tmp_path):
    """EngineSet picks the plan and profile of each kind and checks the plan header; binding_plan feeds every
    graph input within the kind's optimization profile and binds each layer's pool input and its aliased output
    to the same address of the runtime's pool; the real TensorRT-RTX runtime cannot deserialize here (no GPU),
    which tensorrt_runnable reports."""
    import shutil

    from trimode.build.trt_compile import profile_shapes
    from trimode.runtime.executors.engine_kinds import PASS_TO_KIND
    from trimode.runtime.executors.trt_executor import (EngineSet, binding_plan, check_pool, check_profile,
                                                       tensorrt_runnable)
    from trimode.runtime.kv_cache import PagedKVCache
    from trimode.runtime.passes import PassKind, SeqPass

    m = read_manifest(spark["none"])
    plans = EngineSet(spark["none"], m)
    assert plans.flavour == "tensorrt-rtx" and plans.kinds == {k: ("trt/engine.plan", i) for i, k in enumerate(KINDS)}
    assert plans.runtime_cache_path("trt/engine.plan") == spark["none"] / "trt" / "engine.plan.runtime-cache"
    graph = onnx.load(str(spark["none"] / "onnx" / "unified.plugin.onnx"), load_external_data=False).graph
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}  # the engine's I/O names
    cfg, shapes = m["model"]["config"], m["shapes"]
    cache = PagedKVCache(shapes["num_layers"], cfg["num_key_value_heads"], cfg["head_dim"], 64, shapes["page_size"])
    for sid, length in ((0, 9), (1, 3)):
        cache.add_sequence(sid)
        cache.reserve(sid, length + 9)
        cache.set_length(sid, length)
    cases = {PassKind.DECODE: [(1,), (2,)], PassKind.VERIFY: [(1,) * 9, (2,) * 9], PassKind.DRAFT: [(3,) * 8] * 2,
             PassKind.PREFILL: [(4,) * 5, (5,) * 2]}
    for pass_kind, tokens in cases.items():
        passes = [SeqPass(sid, pass_kind, t, cache.length(sid), use_lora=pass_kind is PassKind.DRAFT)
                  for sid, t in enumerate(tokens)]
        kind = PASS_TO_KIND[pass_kind]
        feeds, pools = binding_plan(passes, cache, inputs, outputs)
        check_profile(kind, feeds, shapes)
        profile = profile_shapes(kind, shapes, shapes["num_layers"])
        for name, value in feeds.items():
            if name in profile:
                lo, _, hi = profile[name]
                assert all(a <= d <= b for a, d, b in zip(lo, value.shape, hi)), (kind, name, value.shape)
        assert feeds["is_causal"] == pass_kind.is_causal
        assert (feeds["slot_mapping"] == -1).all() == (not pass_kind.keeps_kv)
        bound = {name: (shape, ptr) for name, shape, ptr in pools}
        for layer in range(shapes["num_layers"]):
            for which, pool in (("k", cache.k_pool), ("v", cache.v_pool)):
                assert bound[f"{which}_pool.{layer}"] == (tuple(pool[layer].shape), pool[layer].data_ptr())
                assert bound[f"{which}_pool_out.{layer}"] == bound[f"{which}_pool.{layer}"]  # in place
    check_pool(cache, shapes)  # 64 pages of the built size: within the profile's pool
    with pytest.raises(ValueError, match="the engines' profiles take at most 256"):
        check_pool(PagedKVCache(1, 1, 1, shapes["max_pages_total"] + 1, shapes["page_size"]), shapes)
    too_many = [SeqPass(0, PassKind.DECODE, (1,) * 10, cache.length(0))]  # verify-sized pass on decode
    with pytest.raises(ValueError, match="decode engine: 10 tokens"):
        check_profile("decode", binding_plan(too_many, cache, inputs, outputs)[0], shapes)
    ok, why = tensorrt_runnable(spark["none"])
    assert not ok and "no CUDA GPU" in why
    # a plan whose header disagrees with the manifest is refused before TensorRT sees it
    bad = tmp_path / "bad"
    shutil.copytree(spark["none"], bad)
    data = bytearray((bad / "trt" / "engine.plan").read_bytes())
    data[0x20] = 0b111100
    (bad / "trt" / "engine.plan").write_bytes(bytes(data))
    with pytest.raises(EngineMismatch, match="header targets"):
        EngineSet(bad, m)
    # and the real runtime exists here but cannot load a plan without a GPU (measured: returns None)
    report = in_child("runtime", str(spark["none"] / "trt" / "engine.plan"))
    version = tensorrt_libs.flavour_version("tensorrt-rtx")
    assert report == {"header_size": 64, "engine": None, "flavour_version": version}


def test_manifest_json_of_a_spark_build_is_json(spark):
    """The TensorRT section is plain JSON (the manifest is read by other tools), and none of the above loaded
    TensorRT-RTX into this process (builds, status and checks keep it in child processes)."""
    section = json.loads((spark["w4a16"] / "manifest.json").read_text())["tensorrt"]
    assert set(section) >= {"flavour", "version", "compute_capabilities", "layout", "engines", "plans"}
    assert not {"tensorrt_rtx", "tensorrt_rtx_bindings", "tensorrt_rtx_libs"} & set(sys.modules)


# ---- checks run in a child interpreter (TensorRT-RTX loaded there only) -------------------------------------

def check_plugins() -> dict:
    import numpy as np

    from trimode.plugins import trt_plugins

    trt = tensorrt_libs.import_tensorrt("tensorrt-rtx")
    trt_plugins.register(trt)
    registry = trt.get_plugin_registry()
    ints, floats = trt.PluginFieldType.INT32, trt.PluginFieldType.FLOAT32

    def fields(**values):
        return trt.PluginFieldCollection([trt.PluginField(k, np.array([v], np.float32 if isinstance(v, float) else
                                                                      np.int32), floats if isinstance(v, float)
                                                          else ints) for k, v in values.items()])

    def create(op, fc, phase=trt.TensorRTPhase.BUILD):
        return registry.get_creator(op, "1", "trimode").create_plugin(op, fc, phase)

    creators = sorted(op for op in trt_plugins.OPS if registry.get_creator(op, "1", "trimode") is not None)
    attention = create("paged_attention", fields(is_causal=0, scale=0.125, page_size=16))
    stored = list(attention.get_fields_to_serialize())
    again = create("paged_attention", trt.PluginFieldCollection(
        [trt.PluginField(f.name, np.asarray(f.data), f.type) for f in stored]), trt.TensorRTPhase.RUNTIME)
    append = create("kv_append", trt.PluginFieldCollection([]))
    dt = trt.DataType
    assert append.get_output_data_types([dt.BF16, dt.BF16, dt.FLOAT, dt.FLOAT, dt.INT64]) == [dt.FLOAT, dt.FLOAT]
    unmask = create("confidence_unmask", fields(mask_token_id=3))
    assert unmask.get_output_data_types([dt.HALF, dt.BOOL]) == [dt.INT32, dt.FLOAT]
    try:
        create("draft_verify", trt.PluginFieldCollection([]))
        missing = ""
    except KeyError as e:
        missing = str(e)
    return {"creators": creators, "attention_attrs": attention.attrs, "round_trip": again.attrs == attention.attrs,
            "kv_append_aliases": [append.get_aliased_input(i) for i in range(append.num_outputs)],
            "attention_aliases": [attention.get_aliased_input(0)], "missing_field": missing}


def check_runtime(plan: str) -> dict:
    trt = tensorrt_libs.import_tensorrt("tensorrt-rtx")
    runtime = trt.Runtime(trt.Logger(trt.Logger.INTERNAL_ERROR))
    engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
    return {"header_size": runtime.engine_header_size, "engine": None if engine is None else "loaded",
            "flavour_version": str(trt.__version__)}


def check_decide() -> dict:
    from onnx import TensorProto, helper

    from trimode.build.plugin_ops import plugin_attributes
    from trimode.plugins import trt_plugins

    trt = tensorrt_libs.import_tensorrt("tensorrt-rtx")
    trt_plugins.register(trt)
    attrs = {"plugin_namespace": "trimode", "plugin_version": "1"}
    attrs.update({k: v for k, v in plugin_attributes("paged_attention").items() if k not in attrs})
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs = [helper.make_tensor_value_info("hidden", f, ["S", "B", 16]),
              helper.make_tensor_value_info("draft_tokens", i32, ["S", "Bm1"]),
              helper.make_tensor_value_info("draft_lens", i32, ["S"]),
              helper.make_tensor_value_info("draft_probs", f, ["S", "Bm1", 32]),
              helper.make_tensor_value_info("uniforms", f, ["S", "B"]),
              helper.make_tensor_value_info("is_masked", TensorProto.BOOL, ["N"])]
    head = helper.make_tensor("head", f, [16, 32], [0.01 * (k % 7) for k in range(16 * 32)])
    nodes = [helper.make_node("MatMul", ["hidden", "head"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
             helper.make_node("draft_verify", ["draft_tokens", "logits", "draft_lens"], ["accepted", "bonus"],
                              domain="trimode", mask_token_id=3, **attrs),
             helper.make_node("draft_verify_sampling", ["draft_tokens", "draft_lens", "draft_probs", "probs",
                                                        "uniforms"], ["s_accepted", "s_bonus"], domain="trimode",
                              **attrs),
             helper.make_node("Reshape", ["logits", "flat_shape"], ["rows"]),
             helper.make_node("confidence_unmask", ["rows", "is_masked"], ["tokens", "confidence"],
                              domain="trimode", mask_token_id=3, **attrs)]
    shape = helper.make_tensor("flat_shape", TensorProto.INT64, [2], [-1, 32])
    outputs = [helper.make_tensor_value_info(n, t, None) for n, t in
               (("accepted", i32), ("bonus", i32), ("s_accepted", i32), ("s_bonus", i32), ("tokens", i32),
                ("confidence", f))]
    model = helper.make_model(helper.make_graph(nodes, "decide", inputs, outputs, [head, shape]),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("trimode", 1)])
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [str(parser.get_error(k)) for k in range(parser.num_errors)]
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM121, 0)
    profile = builder.create_optimization_profile()
    dims = {"hidden": ((1, 2, 16), (2, 5, 16), (4, 9, 16)), "draft_tokens": ((1, 1), (2, 4), (4, 8)),
            "draft_lens": ((1,), (2,), (4,)), "draft_probs": ((1, 1, 32), (2, 4, 32), (4, 8, 32)),
            "uniforms": ((1, 2), (2, 5), (4, 9)), "is_masked": ((2,), (10,), (36,))}
    for name, (lo, opt, hi) in dims.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    outs = {network.get_output(k).name: network.get_output(k).dtype.name for k in range(network.num_outputs)}
    return {"built": plan is not None, "outputs": outs,
            "targets": tensorrt_libs.rtx_plan_header(bytes(plan))["targets"] if plan is not None else None}


if __name__ == "__main__":
    print(json.dumps({"plugins": check_plugins, "runtime": check_runtime, "decide": check_decide}[sys.argv[1]](
        *sys.argv[2:])))


def test_auto_executor_falls_back_to_onnxruntime_without_a_gpu(spark, capsys):
    """A spark engine directory on this GPU-less machine: ``executor="auto"`` (the API's and the CLI's default)
    runs the reference graphs with onnxruntime and generates; ``executor="tensorrt"`` is refused before anything
    is loaded, with the reason (no CUDA GPU) and the executor that does run here; the CLI exits 2 with it."""
    from trimode.runtime.api import TriModeLM
    from trimode.runtime.assembly import engine_executor
    from trimode.runtime.cli.main import main as cli_main
    from trimode.runtime.executors.engine_dir import EngineDirError

    assert engine_executor(spark["none"]) == "onnxruntime"
    lm = TriModeLM.from_engine(spark["none"])
    assert type(lm.executor).__name__ == "OnnxRuntimeExecutor"
    assert len(lm.ar_generate([[3, 4, 5]], 4)[0].token_ids) == 4
    with pytest.raises(EngineDirError, match="no CUDA GPU is visible.*'onnxruntime' runs"):
        TriModeLM.from_engine(spark["none"], executor="tensorrt")
    code = cli_main(["generate", "--engine", str(spark["none"]), "--executor", "tensorrt", "hello"])
    assert code == 2 and "no CUDA GPU" in capsys.readouterr().err

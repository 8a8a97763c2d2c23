"""#5 engine directories: manifest contents, refusal of mismatches and modified files, a SIGKILLed build leaving
nothing the runtime accepts, one-line errors of scripts/build_engine.py, the Spark budget, and the TensorRT 11
stage's control flow (hopper / blackwell targets) against a stand-in ``tensorrt``: TensorRT 11 cannot be
installed here. The TensorRT-RTX stage (spark / rtx) runs the real builder: tests/builder/test_tensorrt_rtx.py."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import onnx
import pytest

from build_helpers import BUILD_SCRIPT, child_env, finish, start_build
from trimode.build.pipeline import BuildError, BuildOptions
from trimode.runtime.api import TriModeLM
from trimode.runtime.executors.engine_dir import EngineDirError, EngineMismatch, check_engine_dir, checkpoint_hash, read_manifest


def build_script():
    spec = importlib.util.spec_from_file_location("build_engine_script", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def engine(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("engdir") / "eng"
    finish(start_build(checkpoints["gqa2-yarn-lora"], out, "none", "--modes", "ar,spec"))
    return out


def test_manifest_describes_the_build(engine, checkpoints):
    m = read_manifest(engine)
    assert m["stage"] == "onnx" and m["tensorrt"] is None
    assert m["model"]["content_hash"] == checkpoint_hash(checkpoints["gqa2-yarn-lora"])
    assert m["recipe"]["name"] == "none" and m["modes"] == ["ar", "spec"]
    assert list(m["engine_kinds"]) == ["prefill", "decode", "draft", "verify"]
    assert m["shapes"]["page_size"] == 4 and m["shapes"]["block_length"] == 8 and m["shapes"]["max_batch"] == 4
    assert m["plugins"] == {"namespace": "trimode", "versions": {"paged_attention": "1", "kv_append": "1",
                                                                 "draft_verify": "1", "draft_verify_sampling": "1",
                                                                 "confidence_unmask": "1"},
                            "onnx_domain": "trimode", "reference_form": "standard ONNX ops"}
    for tool in ("python", "trimode", "torch", "onnx", "onnxruntime", "nvidia-modelopt", "tensorrt"):
        assert tool in m["tools"]
    assert m["tools"]["tensorrt"] is None
    files = m["files"]
    assert "onnx/weights.bin" in files and "checkpoint/config.json" in files and "manifest.json" not in files
    assert all(len(f["sha256"]) == 64 for f in files.values())
    text = (engine / "manifest.json").read_text()
    assert str(engine.parent) not in text  # no absolute paths of the build machine
    check_engine_dir(engine, verify_hashes="all")


@pytest.mark.parametrize("field,kwargs", [
    ("model.content_hash", {"model_hash": "0" * 64}),
    ("shapes.page_size", {"page_size": 16}),
    ("shapes.block_length", {"block_length": 32}),
    ("plugins.versions.paged_attention", {"plugin_versions": {"paged_attention": "2", "kv_append": "1"}}),
])
def test_manifest_mismatch_is_refused_naming_the_field(engine, field, kwargs):
    with pytest.raises(EngineMismatch) as e:
        check_engine_dir(engine, **kwargs)
    assert e.value.field == field and field in str(e.value)


def test_runtime_refuses_a_page_size_mismatch_and_modified_files(engine, tmp_path):
    with pytest.raises(EngineMismatch, match="shapes.page_size"):
        TriModeLM.from_engine(engine, page_size=8)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(engine), str(copy)], check=True)
    with open(copy / "onnx" / "decode.reference.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineDirError, match="decode.reference.onnx has"):
        check_engine_dir(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(EngineDirError, match="no manifest.json"):
        TriModeLM.from_engine(copy)


def test_build_killed_midway_leaves_nothing_the_runtime_accepts(checkpoints, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(BUILD_SCRIPT), "--model", checkpoints["mha-default-rope"],
                             "--out", str(out), "--quant", "fp8", "--calib-text", "w5 w6 w7 " * 50,
                             "--calib-samples", "2", "--calib-seq-len", "16", "--page-size", "4"],
                            stderr=subprocess.PIPE, text=True, env=child_env(), start_new_session=True)
    for line in proc.stderr:  # wait until the build is inside its quantization stage
        if line.startswith("[2/5]"):
            break
    os.killpg(proc.pid, signal.SIGKILL)  # the build and its ModelOpt child
    proc.wait()
    partials = list(tmp_path.glob(".killed.partial-*"))
    assert not out.exists() and len(partials) == 1
    for candidate in (out, partials[0]):
        with pytest.raises(EngineDirError):
            check_engine_dir(candidate)
    # the next build removes the stale partial directory and finishes (recipe none: fast)
    finish(start_build(checkpoints["mha-default-rope"], out, "none"))
    assert not list(tmp_path.glob(".killed.partial-*"))
    check_engine_dir(out)


def test_build_errors_are_one_line(tmp_path, checkpoints, capsys):
    script = build_script()
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    cases = [
        (["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "no such directory"),
        (["--model", str(bad), "--out", str(tmp_path / "o")], "not an NLD checkpoint: unsupported model_type 'llama'"),
        (["--model", checkpoints["gqa2-yarn-lora"], "--out", str(tmp_path / "o"), "--quant", "int3"],
         "unknown recipe 'int3' (--quant); choose from: none, fp8, fp8-kv, w4a16"),
        (["--model", checkpoints["gqa2-yarn-lora"], "--out", str(tmp_path / "o"), "--target", "spark",
          "--tp", "2"],
         "--target spark is one GPU; --tp 2 needs as many GPUs"),
        (["--model", checkpoints["gqa2-yarn-lora"], "--out", str(tmp_path / "o"), "--modes", "ar,fast"],
         "unknown mode(s) ['fast']"),
        (["--from-onnx", str(tmp_path)], "has no manifest.json"),
    ]
    for argv, message in cases:
        assert script.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_existing_out_is_up_to_date_or_refused(engine, checkpoints, capsys):
    from trimode.build.pipeline import build

    opts = dict(model=Path(checkpoints["gqa2-yarn-lora"]), out=engine, modes=("ar", "spec"),
                block_length=8, max_batch=4, max_seq=256, page_size=4, progress=False)
    assert build(BuildOptions(**opts))["build_key"] == read_manifest(engine)["build_key"]
    with pytest.raises(BuildError, match="holds a different build .differs in: block_length"):
        build(BuildOptions(**{**opts, "block_length": 16}))
    assert "is up to date" in capsys.readouterr().err


def test_overwrite_replaces_a_different_build_only_when_done(checkpoints, tmp_path):
    from trimode.build.pipeline import build

    opts = dict(model=Path(checkpoints["gqa2-yarn-lora"]), out=tmp_path / "eng", modes=("ar",), block_length=8,
                max_batch=4, max_seq=64, page_size=4, progress=False)
    build(BuildOptions(**opts), log=lambda _: None)
    replaced = build(BuildOptions(**{**opts, "block_length": 16}, overwrite=True), log=lambda _: None)
    assert read_manifest(tmp_path / "eng")["build_key"] == replaced["build_key"]
    assert replaced["shapes"]["block_length"] == 16 and sorted(p.name for p in tmp_path.iterdir()) == ["eng"]
    check_engine_dir(tmp_path / "eng", verify_hashes="all")


def test_spark_selects_w4a16_and_budgets_128gb(checkpoints, tmp_path):
    opts = BuildOptions(model=Path(checkpoints["gqa2-yarn-lora"]), out=tmp_path / "o", target="spark")
    assert opts.recipe_name == "w4a16"
    lines = build_script().memory_budget(opts.model, opts)
    text = "\n".join(lines)
    assert "128 GiB unified" in lines[0] and "int4 weights" in lines[0]
    for name in ("3B", "8B", "14B", "gqa2-yarn-lora"):
        assert f"{name}:" in text
    assert "KV tokens" in text and "weights per GPU" in text and "activations" in text


def test_budget_per_gpu_follows_tp(checkpoints, tmp_path):
    """--target hopper --tp 2 budgets each of two 80 GiB GPUs: half the weights and KV per token of --tp 1."""
    import re

    script = build_script()
    base = dict(model=Path(checkpoints["gqa2-yarn-lora"]), out=tmp_path / "o", target="hopper", max_seq=4096)
    text = {tp: "\n".join(script.memory_budget(base["model"], BuildOptions(**base, tp=tp))) for tp in (1, 2)}
    assert "80 GiB per GPU, --tp 2" in text[2].splitlines()[0]

    def row(tp, model, label):
        block = text[tp].split(f"\n{model}: ")[1].split("\n", 1)[1]
        return float(re.search(rf"{label}\s+([0-9.]+)", block).group(1))

    for model in ("3B", "8B", "14B"):
        assert f"{model}: " in text[1] and ", tp 2," in text[2].split(f"\n{model}: ")[1].splitlines()[0]
        assert row(2, model, "weights per GPU") == pytest.approx(row(1, model, "weights per GPU") / 2, rel=0.01)
        assert row(2, model, "KV per token per GPU") == pytest.approx(row(1, model, "KV per token per GPU") / 2)


def _fake_builder(trt, calls: dict) -> None:
    """Builder / parser / network stand-ins on the fake ``tensorrt`` module; the parser turns the graph's
    inputs into network inputs and its DistCollective nodes into layers (num_ranks left at 1)."""

    class Layer:
        def __init__(self, type_):
            self.type, self.num_ranks = type_, 1

    class Network:
        def __init__(self):
            self.inputs, self.layers = [], []

        @property
        def num_inputs(self):
            return len(self.inputs)

        @property
        def num_layers(self):
            return len(self.layers)

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

        def get_layer(self, i):
            return self.layers[i]

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse(self, model, path):
            calls["parsed"].append(os.path.basename(path))
            graph = onnx.load_from_string(model).graph
            calls["kv_first"] = all(n.op_type == "kv_append" for n in graph.node if "k_pool.0" in n.input)
            self.network.inputs = [i.name for i in graph.input]
            self.network.layers = [Layer("dist") for n in graph.node if n.op_type == "DistCollective"]
            calls["layers"] = self.network.layers
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            assert len(lo) == len(opt) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, opt, hi)), name
            self.shapes[name] = (lo, opt, hi)

    class Config:
        def create_timing_cache(self, data):
            return types.SimpleNamespace(serialize=lambda: b"timing")

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def set_memory_pool_limit(self, pool, size):
            pass

        def set_preview_feature(self, feature, on):
            calls["preview"] = (feature, on)

        def add_optimization_profile(self, profile):
            calls["profiles"].append(profile)
            return len(calls["profiles"]) - 1

    class Builder:
        def __init__(self, logger):
            pass

        def create_builder_config(self):
            return Config()

        def create_network(self, flags):
            assert flags == 1 << 7  # strongly typed
            return Network()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"plan"

    severity = types.SimpleNamespace(ERROR=1, INTERNAL_ERROR=0)
    trt.ILogger = type("ILogger", (), {"Severity": severity, "__init__": lambda self: None})
    trt.PreviewFeature = types.SimpleNamespace(ALIASED_PLUGIN_IO_10_03="aliased-io")
    trt.Builder, trt.OnnxParser = Builder, Parser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=7)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.LayerType = types.SimpleNamespace(DIST_COLLECTIVE="dist")
    trt.IDistCollectiveLayer = Layer
    trt.__version__ = "11.0-fake"


@pytest.fixture()
def fake_trt(monkeypatch):
    """A stand-in ``tensorrt`` with a builder for the duration of a test; yields the calls it saw."""
    import fake_tensorrt
    import trimode.plugins.trt_plugins as plugins

    saved = {k: sys.modules.get(k) for k in ("tensorrt", "tensorrt.plugin")}
    fake_tensorrt.install()
    calls = {"profiles": [], "parsed": [], "plugins": 0}
    _fake_builder(sys.modules["tensorrt"], calls)
    monkeypatch.setattr(plugins, "register", lambda trt: calls.__setitem__("plugins", 1))
    try:
        yield calls
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_tensorrt_stage_against_a_stand_in(engine, fake_trt, tmp_path):
    """One engine from the unified graph with one optimization profile per kind, the timing cache written, the
    plugins registered: the control flow of build/trt_compile.py on a fake ``tensorrt``."""
    from trimode.build.trt_compile import build_engines

    calls = fake_trt
    m = read_manifest(engine)
    section = build_engines(engine / "onnx", tmp_path / "trt", list(m["engine_kinds"]), m["shapes"],
                            m["shapes"]["num_layers"], "shared")
    assert calls["plugins"] == 1 and calls["parsed"] == ["unified.plugin.onnx"]
    assert (tmp_path / "trt" / "engine.plan").read_bytes() == b"plan"
    assert (tmp_path / "trt" / "timing.cache").read_bytes() == b"timing"
    assert {k: v["profile"] for k, v in section["engines"].items()} == {"prefill": 0, "decode": 1, "draft": 2,
                                                                       "verify": 3}
    decode, prefill = calls["profiles"][1].shapes, calls["profiles"][0].shapes
    assert decode["input_ids"][2] == (4,) and prefill["input_ids"][2] == (4 * 256,)
    assert calls["profiles"][2].shapes["input_ids"][2] == (4 * 9,)  # draft: a block (+1) per sequence
    assert "k_pool.0" in decode and "is_causal" not in decode
    # TensorRT 11 path: the stand-in's manifest section names the flavour; kv_append aliased, wired kv-first
    assert section["flavour"] == "tensorrt" and section["version"] == "11.0-fake"
    assert section["compute_capabilities"] == ["SM90"]  # (no GPU here: the target's)
    assert calls["preview"] == ("aliased-io", True) and calls["kv_first"]


def test_tensorrt_stage_builds_one_engine_set_per_rank(checkpoints, fake_trt, tmp_path):
    """--tp 2: each rank's unified graph is compiled into trt/rank<r>/, its 2L+1 DistCollective layers set to
    2 ranks, its KV pool profile on its share of the heads; the manifest lists every rank's plans."""
    from trimode.build.pipeline import build, finish_from_onnx

    out = tmp_path / "tp2"
    build(BuildOptions(model=Path(checkpoints["gqa2-yarn-lora"]), out=out, tp=2, block_length=4, max_batch=4,
                       max_seq=64, page_size=4, progress=False), log=lambda _: None)
    import trimode.build.pipeline as pipeline

    pipeline_status = pipeline.tensorrt_status
    pipeline.tensorrt_status = lambda target: (True, "ok")
    try:
        m = finish_from_onnx(out, log=lambda _: None)
    finally:
        pipeline.tensorrt_status = pipeline_status
    assert fake_trt["parsed"] == ["unified.plugin.onnx"] * 2
    layers = m["shapes"]["num_layers"]
    assert len(fake_trt["layers"]) == 2 * layers + 1 and {x.num_ranks for x in fake_trt["layers"]} == {2}
    ranks = m["tensorrt"]["ranks"]
    assert [r["engines"]["draft"]["plan"] for r in ranks] == ["trt/rank0/engine.plan", "trt/rank1/engine.plan"]
    assert (out / "trt" / "rank1" / "engine.plan").read_bytes() == b"plan"
    pool = fake_trt["profiles"][0].shapes["k_pool.0"][2]
    assert pool[2] == m["shapes"]["num_kv_heads_per_rank"] == m["shapes"]["num_kv_heads"] // 2
    check_engine_dir(out, verify_hashes="all")  # the manifest was rewritten last, with the new files

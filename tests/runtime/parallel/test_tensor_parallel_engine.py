"""#8 per-rank engine export: ``build_engine.py --tp N`` writes one graph set per rank (recorded in the
manifest), each rank's graphs compute its shard with all-reduces, and N ranks running them give the
single-rank tokens in every mode: as threads of this process (fast) and as MPI ranks through the CLI (slow).
Quantized shards are cut in their stored form and checked against the dequantized full weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import random_prompts
from tp_helpers import _last_json, _mpiexec, run_ranks, run_workload_on_ranks
from trimode.build.onnx_graph import LINEARS, ModelWeights
from trimode.build.pipeline import BuildError, BuildOptions, build
from trimode.build.plugin_ops import TRT_COLLECTIVE, contrib_session, register_onnx_schemas
from trimode.build.sharding import shard_weights
from trimode.runtime.api import TriModeLM
from trimode.runtime.executors.engine_dir import EngineMismatch, check_engine_dir
from trimode.runtime.executors.decisions import decision_feeds
from trimode.runtime.executors.ort_ops import REFERENCE_ALL_REDUCE, register_tp_comm, unregister_tp_comm
from trimode.runtime.model.checkpoint import load_config
from trimode.runtime.model.config import tiny_config
from trimode.runtime.model.quantized import dequantize_weight
from trimode.runtime.parallel.comm import TensorParallelConfigError
from trimode.runtime.request import ARConfig, DiffusionConfig, SpecConfig

OPTS = dict(block_length=4, max_batch=4, max_seq=128, page_size=4, progress=False)


@pytest.fixture(scope="module")
def engines(checkpoints, tmp_path_factory):
    """tp 1 and tp 2 builds of the same checkpoint (GQA 4 query / 2 KV heads, drafter LoRA)."""
    tmp = tmp_path_factory.mktemp("tpeng")
    ckpt = Path(checkpoints["gqa2-yarn-lora"])
    out = {"ckpt": ckpt}
    for tp in (1, 2):
        out[tp] = tmp / f"tp{tp}"
        build(BuildOptions(model=ckpt, out=out[tp], tp=tp, **OPTS), log=lambda _: None)
    return out


def workload(lm, prompts):
    out = {}
    modes = {"ar": ARConfig(), "diffusion": DiffusionConfig(4), "spec": SpecConfig(4),
             "mixed": None}
    for name, mode in modes.items():
        configs = [mode] * len(prompts) if mode else [ARConfig(), DiffusionConfig(4), SpecConfig(4)]
        results = lm.run([lm.request(p, 10, m) for p, m in zip(prompts, configs)])
        out[name] = [(r.token_ids, r.forwards, r.accepted_lengths) for r in results]
    return out


def test_manifest_records_one_graph_set_per_rank(engines):
    m = check_engine_dir(engines[2])
    cfg = load_config(engines["ckpt"])
    assert m["tensor_parallel"]["size"] == 2 and m["tensor_parallel"]["graph_dirs"] == ["onnx/rank0", "onnx/rank1"]
    assert m["build_key"]["tp"] == 2 and "tp" not in check_engine_dir(engines[1])["build_key"]
    assert m["shapes"]["num_kv_heads_per_rank"] == cfg.num_key_value_heads // 2
    one = check_engine_dir(engines[1])["files"]
    for rank in (0, 1):
        for kind, files in m["engine_kinds"].items():
            for form in ("plugin", "reference"):
                assert f"onnx/rank{rank}/{files[form]}" in m["files"], (rank, kind, form)
        # each rank stores about half of the weights (norms replicated, everything else split)
        share = m["files"][f"onnx/rank{rank}/weights.bin"]["bytes"] / one["onnx/weights.bin"]["bytes"]
        assert 0.45 < share < 0.6, share


def test_plugin_graphs_carry_collectives_and_local_shapes(engines):
    register_onnx_schemas()
    cfg = load_config(engines["ckpt"])
    layers = cfg.num_hidden_layers
    for rank in (0, 1):
        for name in ("prefill", "draft", "unified"):
            path = engines[2] / "onnx" / f"rank{rank}" / f"{name}.plugin.onnx"
            onnx.checker.check_model(str(path))
            model = onnx.load(str(path), load_external_data=False)
            reduces = [n for n in model.graph.node if n.op_type == TRT_COLLECTIVE]
            assert len(reduces) == 2 * layers + 1  # o_proj and down_proj of every layer, and the embedding
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in reduces[0].attribute}
            assert attrs["collective_operation"] == b"all_reduce" and attrs["reduce_op"] == b"sum"
            assert attrs["nb_rank"] == 2 and attrs["root"] == -1
            pool = next(i for i in model.graph.input if i.name == "k_pool.0").type.tensor_type.shape.dim
            assert pool[2].dim_value == cfg.num_key_value_heads // 2
            logits = model.graph.output[0].type.tensor_type.shape.dim
            assert logits[1].dim_value == cfg.vocab_size // 2
        ref = onnx.load(str(engines[2] / "onnx" / f"rank{rank}" / "prefill.reference.onnx"), load_external_data=False)
        ops = [n for n in ref.graph.node if n.op_type == REFERENCE_ALL_REDUCE]
        assert len(ops) == 2 * layers + 1
        assert {a.name: a.i for a in ops[0].attribute} == {"rank": rank, "world_size": 2}


def test_two_thread_ranks_on_the_engine_equal_one_rank_in_every_mode(engines):
    prompts = random_prompts([5, 11, 3], seed=1)
    want = workload(TriModeLM.from_pretrained(engines["ckpt"], num_pages=64, page_size=4), prompts)
    single_engine = workload(TriModeLM.from_engine(engines[1], num_pages=64, threads=1), prompts)

    got, caches = run_workload_on_ranks(
        lambda comm: TriModeLM.from_engine(engines[2], comm=comm, num_pages=64, threads=1),
        lambda lm: workload(lm, prompts))
    assert got == want == single_engine
    cfg = load_config(engines["ckpt"])
    for cache in caches:
        assert cache.k_pool.shape[3] == cfg.num_key_value_heads // 2


def test_each_ranks_tensorrt_graph_computes_its_share(engines):
    """The plugin-form graphs TensorRT gets (plugin ops and DistCollective run through onnxruntime-extensions):
    two ranks' prefill logits, concatenated, equal the tp 1 plugin graph's."""
    ids = np.array(random_prompts([6], seed=4)[0], np.int64)
    cfg = load_config(engines["ckpt"])
    pool = lambda heads: np.zeros((4, 4, heads, cfg.head_dim), np.float32)  # noqa: E731

    def feeds(heads):
        f = {"input_ids": ids, "positions": np.arange(6, dtype=np.int64),
             "block_tables": np.array([[0, 1]], np.int32), "context_lens": np.array([0], np.int32),
             "query_start": np.array([0, 6], np.int32), "logits_index": np.arange(6, dtype=np.int64),
             "slot_mapping": np.arange(6, dtype=np.int64)}
        for layer in range(cfg.num_hidden_layers):
            f[f"k_pool.{layer}"], f[f"v_pool.{layer}"] = pool(heads), pool(heads)
        return f

    def run(path, heads, rank=0):
        model = onnx.load(str(path))
        session = contrib_session(model, tp_rank=rank)
        names = {i.name for i in session.get_inputs()}  # tp 1: the decision inputs too (empty: nothing decides)
        return session.run(["logits"], {k: v for k, v in {**feeds(heads), **decision_feeds([])}.items()
                                        if k in names})[0]

    want = run(engines[1] / "onnx" / "prefill.plugin.onnx", cfg.num_key_value_heads)

    def rank(comm):
        register_tp_comm(comm)
        try:
            return run(engines[2] / "onnx" / f"rank{comm.rank}" / "prefill.plugin.onnx", cfg.num_key_value_heads // 2,
                       comm.rank)
        finally:
            unregister_tp_comm(comm)

    got = np.concatenate(run_ranks(2, rank), axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_tp_engine_is_refused_where_it_cannot_run(engines):
    with pytest.raises(EngineMismatch, match="tensor_parallel.size is 2 in its manifest, the runtime asks for 1"):
        TriModeLM.from_engine(engines[2])
    with pytest.raises(EngineMismatch, match="tensor_parallel.size is 1 in its manifest, the runtime asks for 2"):
        run_ranks(2, lambda comm: TriModeLM.from_engine(engines[1], comm=comm))


def test_sizes_that_do_not_divide_fail_in_one_line(engines, tmp_path):
    with pytest.raises(BuildError, match=r"--tp: --tp 3 does not divide num_attention_heads=4, num_key_value_heads=2"):
        build(BuildOptions(model=engines["ckpt"], out=tmp_path / "x", tp=3, **OPTS), log=lambda _: None)
    assert not (tmp_path / "x").exists()
    with pytest.raises(BuildError, match="--target spark is one GPU"):
        BuildOptions(model=engines["ckpt"], out=tmp_path / "y", tp=2, target="spark")


# ---- quantized shards: cut in stored form ----------------------------------------------------------------

def _packed_int4(out_f: int, in_f: int, group: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"weight": torch.randint(0, 256, (out_f // 2, in_f), generator=gen, dtype=torch.uint8),
            "weight_scale": torch.rand(out_f, in_f // group, generator=gen) + 0.1,
            "pre_quant_scale": torch.rand(in_f, generator=gen) + 0.5}


def _quantized_weights(group: int, fmt: str) -> ModelWeights:
    """A tiny config's tensors as a w4a16 (int4 AWQ, group ``group``) or fp8 checkpoint stores them."""
    cfg = tiny_config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16)
    gen = torch.Generator().manual_seed(0)
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"self_attn.q_proj": (q_out, 64), "self_attn.k_proj": (kv_out, 64), "self_attn.v_proj": (kv_out, 64),
              "self_attn.o_proj": (64, q_out), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
              "mlp.down_proj": (64, 128)}
    t = {"encoder.embed_tokens.weight": torch.randn(cfg.vocab_size, 64, generator=gen),
         "diffusion_head.weight": torch.randn(cfg.vocab_size, 64, generator=gen),
         "encoder.norm.weight": torch.rand(64, generator=gen)}
    for i in range(cfg.num_hidden_layers):
        for lin in LINEARS:
            out_f, in_f = shapes[lin]
            name = f"encoder.layers.{i}.{lin}"
            if fmt == "int4":
                t.update({f"{name}.{k}": v for k, v in _packed_int4(out_f, in_f, group, gen).items()})
            else:
                t[f"{name}.weight"] = torch.randn(out_f, in_f, generator=gen).to(torch.float8_e4m3fn)
                t[f"{name}.weight_scale"], t[f"{name}.input_scale"] = torch.tensor(0.02), torch.tensor(0.5)
        t[f"encoder.layers.{i}.self_attn.k_proj.k_scale"] = torch.tensor(1.0)
    lora = [(torch.randn(4, q_out, generator=gen), torch.randn(64, 4, generator=gen))
            for _ in range(cfg.num_hidden_layers)]
    return ModelWeights(cfg, t, lora, 2.0, {})


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_quantized_shards_dequantize_to_the_shards_of_the_full_weights(fmt):
    full = _quantized_weights(32, fmt)
    shards = [shard_weights(full, r, 2) for r in range(2)]
    for i in range(full.config.num_hidden_layers):
        for lin in LINEARS:
            name = f"encoder.layers.{i}.{lin}"
            whole = dequantize_weight(full.tensors, name)
            dim = 1 if lin in ("self_attn.o_proj", "mlp.down_proj") else 0
            parts = [dequantize_weight(s.tensors, name) for s in shards]
            assert all(p.shape[dim] == whole.shape[dim] // 2 for p in parts), name
            torch.testing.assert_close(torch.cat(parts, dim), whole, rtol=0, atol=0)
        a = full.lora[i][0]
        torch.testing.assert_close(torch.cat([s.lora[i][0] for s in shards], 1), a)
    assert torch.equal(shards[1].tensors["encoder.layers.0.self_attn.k_proj.k_scale"], torch.tensor(1.0))
    vocab = full.config.vocab_size
    assert shards[1].tensors["diffusion_head.weight"].shape[0] == vocab // 2


def test_int4_groups_cut_by_the_split_are_refused():
    full = _quantized_weights(64, "int4")  # o_proj has 64 inputs: 32 per rank at tp 2, half a group
    with pytest.raises(TensorParallelConfigError, match="self_attn.o_proj: each rank's 32 input columns are not "
                                                        "whole int4 groups of 64"):
        shard_weights(full, 0, 2)


# ---- real MPI ranks through the CLI ------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_generate_on_a_tp_engine_over_two_mpi_ranks(engines):
    args = ["-m", "trimode.runtime.cli", "generate", "--mode", "spec", "--max-new-tokens", "9", "--block-length", "4",
            "--json", "w5 w6 w7"]
    one = subprocess.run([sys.executable, *args, "--model", str(engines["ckpt"])], capture_output=True, text=True,
                         timeout=120)
    two = subprocess.run([_mpiexec(), "-n", "2", sys.executable, *args, "--engine", str(engines[2]), "--tp", "2",
                          "--tp-timeout", "30"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    keep = ("text", "forwards", "accepted_lengths", "finish_reason")
    assert {k: _last_json(two.stdout)[k] for k in keep} == {k: _last_json(one.stdout)[k] for k in keep}
    wrong = subprocess.run([_mpiexec(), "-n", "2", sys.executable, *args, "--engine", str(engines[1]), "--tp", "2",
                            "--tp-timeout", "30"], capture_output=True, text=True, timeout=300)
    # every rank refuses (exit status 2); the launcher's status is the first failing rank's, or its kill signal
    assert wrong.returncode != 0 and "tensor_parallel.size is 1 in its manifest" in wrong.stderr, wrong.stderr[-2000:]

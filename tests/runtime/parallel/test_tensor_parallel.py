"""Tensor parallelism: sharded math, the step broadcast, launch and failure handling, the memory planner.

Fast tests run N ranks as threads of this process (``ThreadComm``: the same collectives through a
barrier). The slow ones launch real ranks on CPU (gloo): with ``mpiexec`` from the pip ``mpich`` and
with torchrun's environment variables, including a rank that is killed or frozen mid-run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trimode.build.memory_planner import REFERENCE_CONFIGS, main as planner_main, plan_memory, smallest_tp
from trimode.runtime.api import TriModeLM
from trimode.runtime.model.checkpoint import load_config, load_model
from trimode.runtime.model.config import tiny_config
from trimode.runtime.parallel.comm import (TensorParallelConfigError, discover_launch,
                                         init_tensor_parallel)
from trimode.runtime.parallel.sharding import check_tensor_parallel, load_sharded_model
from trimode.runtime.parallel.step import decode_step, encode_step
from trimode.runtime.passes import PassKind, SeqPass
from trimode.runtime.request import ARConfig, DiffusionConfig, SpecConfig

from conftest import random_prompts
from tp_helpers import _last_json, _mpiexec, run_ranks, run_workload_on_ranks

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "tp_check.py"
SHIPPED = ROOT / "models" / "tiny-kjv"


def dense_inputs(vocab: int):
    ids = torch.tensor(random_prompts([9, 9], vocab=vocab, seed=3))
    return ids, torch.arange(9).expand(2, 9), torch.ones(9, 9, dtype=torch.bool), torch.ones(2, 9)


@pytest.mark.parametrize("variant, tp", [("gqa2-yarn-lora", 2), ("mha-default-rope", 2), ("mha-default-rope", 4),
                                         ("gqa4-yarn-qscale", 2)])
def test_sharded_forward_equals_full_model(checkpoints, variant, tp):
    """Column/row-parallel layers, vocab-parallel embedding and head, sharded LoRA (on for every token)."""
    path = checkpoints[variant]
    full = load_model(path)
    ids, pos, allowed, lora_mask = dense_inputs(full.config.vocab_size)
    with torch.no_grad():
        want = full.forward_dense(ids, pos, allowed, lora_mask)

    def rank(comm):
        model = load_sharded_model(path, comm)
        with torch.no_grad():
            return model, model.forward_dense(ids, pos, allowed, lora_mask)

    (model, got), *others = run_ranks(tp, rank)
    err = (got - want).abs()
    assert err.max() < 1e-4, f"tp {tp}: max error {err.max():.3g}, mean {err.mean():.3g}"
    cfg, attn = full.config, model.encoder.layers[0].self_attn
    assert (attn.hq, attn.hkv) == (cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp)
    assert attn.q_proj.weight.shape == (cfg.num_attention_heads // tp * cfg.head_dim, cfg.hidden_size)
    assert attn.o_proj.weight.shape == (cfg.hidden_size, cfg.num_attention_heads // tp * cfg.head_dim)
    assert model.encoder.embed_tokens.weight.shape == (cfg.vocab_size // tp, cfg.hidden_size)
    assert model.diffusion_head.weight.shape == (cfg.vocab_size // tp, cfg.hidden_size)
    if full.lora is not None:
        assert model.lora.lora_A[0].shape == (full.lora.rank, cfg.num_attention_heads // tp * cfg.head_dim)
        assert model.lora.lora_B[0].shape == full.lora.lora_B[0].shape


def _all_modes(lm, prompts, block=4, max_new_tokens=10):
    out = {}
    for name, mode in {"ar": ARConfig(), "diffusion": DiffusionConfig(block), "spec": SpecConfig(block),
                       "topk": DiffusionConfig(block, "topk", None, max_steps=2)}.items():
        results = lm.run([lm.request(p, max_new_tokens, mode) for p in prompts])
        out[name] = [(r.token_ids, r.forwards, r.accepted_lengths, r.revealed_per_step) for r in results]
    return out


@pytest.mark.parametrize("variant", ["gqa2-yarn-lora", "gqa4-yarn-qscale"])
def test_engine_over_thread_ranks_equals_single_rank(checkpoints, variant):
    """The whole loop: rank 0's scheduler broadcasts each step; the worker's mirrored pool stays in lockstep."""
    path = checkpoints[variant]
    prompts = random_prompts([5, 11, 3], seed=1)
    single = TriModeLM.from_pretrained(path, num_pages=64, page_size=4)
    want = _all_modes(single, prompts)

    got, (cache0, cache1) = run_workload_on_ranks(
        lambda comm: TriModeLM.from_pretrained(path, comm=comm, num_pages=64, page_size=4), lambda lm: _all_modes(lm, prompts))
    assert got == want
    single_numel = single.cache.k_pool.numel() + single.cache.v_pool.numel()
    for cache in (cache0, cache1):
        assert 2 * (cache.k_pool.numel() + cache.v_pool.numel()) == single_numel
        assert cache.k_pool.shape[3] == single.config.num_key_value_heads // 2
    # lockstep: same pages, same rows; each rank's pool holds its KV heads of the single-rank pool
    for pool in ("k_pool", "v_pool"):
        both = torch.cat([getattr(cache0, pool), getattr(cache1, pool)], dim=3)
        torch.testing.assert_close(both, getattr(single.cache, pool), atol=1e-4, rtol=0)


def test_step_message_round_trip():
    passes = [SeqPass(3, PassKind.PREFILL, (5, 6, 7), 0), SeqPass(9, PassKind.DRAFT, (1, 2), 12, 2, True),
              SeqPass(4, PassKind.DENOISE, (8,), 5)]
    tables = [[0, 1], [7, 2, 5, 4], []]
    assert decode_step(encode_step(passes, tables)) == (passes, tables)


# ---- clear errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, tp, names", [
    (dict(), 3, ["num_attention_heads=4", "num_key_value_heads=2", "intermediate_size=128"]),
    (dict(), 4, ["num_key_value_heads=2"]),
    (dict(vocab_size=511), 2, ["vocab_size=511"]),
])
def test_sizes_that_do_not_divide_are_named(overrides, tp, names):
    with pytest.raises(TensorParallelConfigError) as e:
        check_tensor_parallel(tiny_config(**overrides), tp)
    for name in names:
        assert name in str(e.value)
    assert "tensor-parallel sizes that work" in str(e.value)


def test_launch_must_match_tp():
    assert discover_launch({}).world_size == 1
    with pytest.raises(TensorParallelConfigError, match="--tp 2 needs 2 processes but the launcher started 1"):
        init_tensor_parallel(2, env={})
    info = discover_launch({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (info.rank, info.world_size, info.master_addr, info.master_port, info.launcher) == \
        (1, 2, "10.0.0.1", 1234, "torchrun")


# ---- the memory planner ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
def test_planner_halves_per_gpu_weights_and_kv_with_tp2(name):
    cfg = REFERENCE_CONFIGS[name]
    one, two = plan_memory(cfg, 1, gpu_memory_gb=80), plan_memory(cfg, 2, gpu_memory_gb=80)
    assert abs(2 * two.sharded_weight_bytes - one.sharded_weight_bytes) <= 2
    assert two.replicated_weight_bytes == one.replicated_weight_bytes
    assert 0.5 <= (two.sharded_weight_bytes + two.replicated_weight_bytes) / \
        (one.sharded_weight_bytes + one.replicated_weight_bytes) < 0.501
    assert 2 * two.kv_bytes_per_token == one.kv_bytes_per_token
    assert two.kv_budget_bytes > one.kv_budget_bytes and two.num_kv_tokens > 2 * one.num_kv_tokens
    assert one.fits and two.fits


def test_planner_numbers_for_the_real_sizes(capsys):
    params = {name: plan_memory(cfg).num_params for name, cfg in REFERENCE_CONFIGS.items()}
    assert 3.7e9 < params["3B"] < 4.0e9 and 8.4e9 < params["8B"] < 8.6e9 and 13.3e9 < params["14B"] < 13.7e9
    plan = plan_memory(REFERENCE_CONFIGS["8B"], 1)
    assert plan.kv_bytes_per_token == 2 * 34 * 8 * 128 * 2  # K and V, 34 layers, 8 KV heads of 128, bf16
    assert plan.sharded_weight_bytes + plan.replicated_weight_bytes == 2 * params["8B"]  # bf16
    assert plan.replicated_weight_bytes == 2 * (2 * 34 + 1) * 4096  # the norms
    small = plan_memory(REFERENCE_CONFIGS["14B"], 1, gpu_memory_gb=24)
    assert not small.fits and small.num_kv_tokens == 0
    assert smallest_tp(REFERENCE_CONFIGS["14B"], gpu_memory_gb=24) == 2
    assert plan_memory(REFERENCE_CONFIGS["8B"], 1, dtype="fp8", kv_dtype="fp8").num_kv_tokens > 2 * plan.num_kv_tokens
    with pytest.raises(TensorParallelConfigError, match="num_key_value_heads=8"):
        plan_memory(REFERENCE_CONFIGS["8B"], 16)
    assert planner_main(["--model", "8B", "--tp", "2", "--gpu-gb", "80"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("8B: 8.49 B params, tp 2") and json.loads(out[-1])[0]["tp"] == 2


# ---- real ranks (gloo on CPU) ----------------------------------------------------------------------------

def _check_args(path, *extra) -> list[str]:
    return [sys.executable, str(SCRIPT), "--model", str(path), "--tp", "2", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_mpi_ranks_match_single_rank_in_every_mode(ckpt):
    proc = subprocess.run([_mpiexec(), "-n", "2", *_check_args(ckpt, "--reference")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _last_json(proc.stdout)
    for mode, results in report["reference"]["modes"].items():
        assert report["modes"][mode] == results, f"{mode}: tensor-parallel output differs from one rank"
    assert report["max_logit_diff"] < 1e-4
    assert report["kv_pool_numel"] == [report["reference"]["kv_pool_numel"] // 2] * 2


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no shipped model at models/tiny-kjv")
def test_two_mpi_ranks_match_single_rank_on_the_shipped_model():
    try:
        check_tensor_parallel(load_config(SHIPPED), 2)
    except TensorParallelConfigError as e:
        pytest.skip(f"the shipped model cannot be split in 2: {e}")
    proc = subprocess.run([_mpiexec(), "-n", "2", *_check_args(SHIPPED, "--reference", "--prompt-lengths", "6,2",
                                                                "--max-new-tokens", "16", "--block-length", "8")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _last_json(proc.stdout)
    assert report["modes"] == report["reference"]["modes"]


def _wait_for_line(path: Path, text: str, proc: subprocess.Popen, limit_s: float) -> float:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return time.monotonic()
        if proc.poll() is not None and proc.returncode != -9:
            break
        time.sleep(0.1)
    raise AssertionError(f"{path.name} never said {text!r}:\n{path.read_text() if path.exists() else ''}")


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["KILL", "STOP"])
def test_a_dead_or_frozen_rank_stops_the_other_with_an_error(ckpt, tmp_path, signal_name):
    """Ranks launched with torchrun's variables; rank 1 is killed (connection closes) or frozen (timeout)."""
    timeout_s = 5
    args = _check_args(ckpt, "--timeout", str(timeout_s), "--kill-rank", "1", "--kill-after", "2",
                       "--kill-signal", signal_name, "--prompt-lengths", "3", "--max-new-tokens", "8")
    port = str(_free_port())
    procs, logs = [], []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        logs.append(tmp_path / f"rank{rank}.err")
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=logs[-1].open("w"), text=True))
    try:
        killed_at = _wait_for_line(logs[1], f"sending myself SIG{signal_name}", procs[1], 240)
        procs[0].wait(timeout=timeout_s + 60)  # bounded: the collective timeout plus a margin for a busy machine
        stopped_after = time.monotonic() - killed_at
        err = logs[0].read_text()
        assert procs[0].returncode == 1, err
        assert "tp_check: rank 0: error: tensor-parallel rank 0/2" in err and "a peer rank died or did not" in err
        assert stopped_after < timeout_s + 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.mark.slow
def test_mpi_job_ends_with_an_error_when_rank_0_dies(ckpt):
    args = _check_args(ckpt, "--timeout", "5", "--kill-rank", "0", "--kill-after", "2", "--kill-signal", "EXIT",
                       "--prompt-lengths", "3", "--max-new-tokens", "8")
    # -disable-auto-cleanup: the launcher must not kill rank 1 when rank 0 dies (it races rank 1's own error);
    # rank 1 has to notice the dead peer and stop by itself. Rank 0 ends through os._exit, not a signal: Hydra
    # SIGKILLs the other ranks when it reaps one killed by a signal, whatever the cleanup flag.
    start = time.monotonic()
    proc = subprocess.run([_mpiexec(), "-disable-auto-cleanup", "-n", "2", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and time.monotonic() - start < 120
    assert "tp_check: rank 1: error: tensor-parallel rank 1/2: waiting for rank 0's next step failed" in proc.stderr


def _cli_has_tp() -> bool:
    from trimode.runtime.cli import build_parser

    try:
        build_parser().parse_args(["generate", "--model", "m", "--tp", "2", "p"])
    except SystemExit:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _cli_has_tp(), reason="runtime/cli has no --tp")
def test_cli_generate_over_two_mpi_ranks_prints_what_one_rank_prints(ckpt):
    args = ["-m", "trimode.runtime.cli", "generate", "--model", ckpt, "--mode", "spec", "--max-new-tokens", "9",
            "--block-length", "4", "--json", "w5 w6 w7"]
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    two = subprocess.run([_mpiexec(), "-n", "2", sys.executable, *args, "--tp", "2", "--tp-timeout", "30"],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    keep = ("text", "forwards", "accepted_lengths", "finish_reason")
    assert {k: _last_json(two.stdout)[k] for k in keep} == {k: _last_json(one.stdout)[k] for k in keep}
    alone = subprocess.run([sys.executable, *args, "--tp", "2"], capture_output=True, text=True, timeout=120)
    assert alone.returncode == 2 and "--tp 2 needs 2 processes but the launcher started 1" in alone.stderr

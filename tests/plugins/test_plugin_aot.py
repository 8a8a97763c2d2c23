"""The TensorRT side of the plugins, as far as it runs without TensorRT and without a GPU, and the CPU-only
install without Triton.

Each check runs in a fresh interpreter (this file run as a script) because the pytest process runs the kernels
under TRITON_INTERPRET=1, while Triton's compiler needs real (non-interpreted) kernels:

- ``aot``: a stand-in ``tensorrt.plugin`` (tests/fake_tensorrt.py) receives every plugin definition; the
  shape/dtype rules, autotune combinations and AOT implementations are called with concrete shapes; each AOT
  implementation compiles its Triton kernel to PTX for sm_90 (Triton's compiler runs on the host), and the PTX
  parameter list, grid and integer extras are checked against TensorRT's calling convention (inputs, extras,
  outputs, then Triton's two unused scratch pointers) and against what the torch launchers pass.
- ``no-triton`` (first, in the same process): with ``import triton`` failing, the plugin modules import, the
  references run through the dispatcher, and asking for the kernels fails with a clear message.
Not verified here: a TensorRT 11 engine build (not installable) and running the PTX (no GPU). The class-based
IPluginV3 plugins that the engine builds use are built with the real TensorRT-RTX builder in
tests/builder/test_tensorrt_rtx.py.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _run(mode: str) -> dict:
    """This file as a script, without TRITON_INTERPRET; its last output line is a JSON report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), mode], capture_output=True, text=True,
                       env=env, cwd=HERE, timeout=600)
    assert r.returncode == 0, f"{mode} check failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_tensorrt_plugin_definitions_ptx_and_the_install_without_triton():
    report = _run("all")
    assert "`triton` package" in report["no-triton"]["kernel_error"], report
    if report["aot"] is None:
        pytest.skip("triton is not installed: the AOT (PTX) path was not checked")
    assert sorted(report["aot"]) == ["trimode::confidence_unmask", "trimode::draft_verify",
                                     "trimode::draft_verify_sampling", "trimode::kv_append",
                                     "trimode::paged_attention"]


# ---- the checks, run as a script -----------------------------------------------------------------------------

def ptx_params(ptx: str, name: str) -> int:
    entry = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    assert entry, f"no .entry {name} in the PTX"
    return entry.group(1).count(".param")


def check_aot() -> dict:
    import torch

    import fake_tensorrt
    fake_tensorrt.install()
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from trimode.plugins import dispatch
    dispatch.register_tensorrt_plugins()
    reg = fake_tensorrt.REGISTRY
    report = {}

    def run(plugin_id, inputs, attrs, tactic=1):
        """register -> autotune -> aot_impl with concrete descs; checks the PTX against the calling convention."""
        t0 = time.time()
        entry = reg[plugin_id]
        outputs = entry["register"](*inputs, *attrs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        assert len(outputs) == entry["num_outputs"]
        combos = entry["autotune"](*inputs, outputs)
        assert all(len(c.io_types) == len(inputs) + len(outputs) for c in combos), plugin_id
        name, ptx, launch, extra = entry["aot_impl"](*inputs, *attrs, outputs, tactic)
        name, ptx = name.decode(), ptx.decode()
        assert ptx_params(ptx, name) == len(inputs) + len(extra) + len(outputs) + 2, plugin_id
        assert launch.block_x in (32, 64, 128, 256) and launch.shared_mem >= 0
        report[plugin_id] = dict(kernel=name, params=ptx_params(ptx, name), grid=[launch.grid_x, launch.grid_y],
                                 threads=launch.block_x, shared=launch.shared_mem, extra=list(extra),
                                 seconds=round(time.time() - t0, 1))
        return outputs, launch, extra

    d = trtp.TensorDesc
    bf16 = trt.bfloat16
    # paged attention: 3 sequences, 10 new tokens, GQA 4, head dim 64, page 16
    T, S, Hq, Hkv, D, P, page, width = 10, 3, 8, 2, 64, 40, 16, 5
    q, kn, vn = d((T, Hq, D), bf16), d((T, Hkv, D), bf16), d((T, Hkv, D), bf16)
    kp, vp = d((P, page, Hkv, D), bf16), d((P, page, Hkv, D), bf16)
    bt, cl, qs = d((S, width), trt.int32), d((S,), trt.int32), d((S + 1,), trt.int32)
    (out,), launch, extra = run("trimode::paged_attention", (q, kn, vn, kp, vp, bt, cl, qs), (1, D ** -0.5, page))
    assert out.shape_expr == q.shape_expr and out.dtype == bf16
    tq, tk, tp = torch.empty(T, Hq, D), torch.empty(T, Hkv, D), torch.empty(P, page, Hkv, D)
    # what paged_attention_triton passes for contiguous tensors
    assert tuple(extra) == (S, width, *tq.stride()[:2], *tk.stride()[:2], *tp.stride()[:3], *tq.stride()[:2])
    block_q = 16 // (Hq // Hkv)  # tactic 1: BLOCK_M 16
    assert (launch.grid_x, launch.grid_y) == (T // block_q + S, Hkv)

    (k_out, v_out), launch, extra = run("trimode::kv_append", (kn, vn, kp, vp, d((T,), trt.int64)), ())
    assert k_out.aliased_to is kp and v_out.aliased_to is vp, "kv_append must update the pools in place"
    assert launch.grid_x == T and tuple(extra) == tk.stride()[:2]

    B, V = 5, 1000
    outs, launch, extra = run("trimode::draft_verify", (d((S, B - 1), trt.int32), d((S, B, V), bf16),
                                                         d((S,), trt.int32)), (3,))
    assert [o.dtype for o in outs] == [trt.int32] * 2 and outs[0].shape_expr == (S,) and launch.grid_x == S
    assert tuple(extra) == (V, *torch.empty(S, B - 1).stride()[:1], *torch.empty(S, B, V).stride()[:2])
    outs, launch, extra = run("trimode::draft_verify_sampling",
                              (d((S, B - 1), trt.int32), d((S,), trt.int32), d((S, B - 1, V), trt.float32),
                               d((S, B, V), trt.float32), d((S, B), trt.float32)), ())
    assert outs[1].shape_expr == (S,) and launch.grid_x == S
    assert tuple(extra) == (V, B - 1, *torch.empty(S, B - 1, V).stride()[:2], *torch.empty(S, B, V).stride()[:2], B)
    N = 7
    outs, launch, extra = run("trimode::confidence_unmask", (d((N, V), bf16), d((N,), trt.bool)), (3,))
    assert [o.dtype for o in outs] == [trt.int32, trt.float32] and launch.grid_x == N and tuple(extra) == (V, V)
    return report


def check_no_triton() -> dict:
    sys.modules["triton"] = None  # `import triton` now raises ImportError
    import torch

    from trimode.plugins import dispatch, paged_attention
    assert not dispatch.triton_available()
    cpu = torch.device("cpu")
    q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    pool = torch.randn(4, 2, 2, 8)
    tables, lens, starts = torch.tensor([[1, 3]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32), \
        torch.tensor([0, 3], dtype=torch.int32)
    out = dispatch.paged_attention(q, k, k, pool, pool, tables, lens, starts, True, 0.3)
    assert out.shape == q.shape and not out.isnan().any()
    dispatch.kv_append(k, k, pool, pool, torch.tensor([0, -1, 5]))
    tokens, _ = dispatch.confidence_unmask(torch.randn(2, 9), torch.tensor([True, False]), 3)
    assert tokens[1] == -1
    try:
        dispatch.resolve_backend(cpu, "triton")
        raise AssertionError("asking for the kernels without triton must fail")
    except RuntimeError as e:
        assert "triton is not installed" in str(e)
    try:
        paged_attention.paged_attention_triton(q, k, k, pool, pool, tables, lens, starts, True, 0.3)
        raise AssertionError("launching a kernel without triton must fail")
    except RuntimeError as e:
        kernel_error = str(e)
    return {"kernel_error": kernel_error}


def check_all() -> dict:
    """Both checks in one process (one torch import): without triton first, then with it (modules reloaded)."""
    import importlib

    import trimode.plugins.dispatch as dispatch
    report = {"no-triton": check_no_triton()}
    del sys.modules["triton"]
    try:
        import triton  # noqa: F401
    except ImportError:
        return dict(report, aot=None)
    dispatch._HAS_TRITON = None
    for name in ("_common", "paged_attention", "kv_append", "draft_verify", "confidence_unmask"):
        importlib.reload(importlib.import_module(f"trimode.plugins.{name}"))
    return dict(report, aot=check_aot())


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))  # the shared test helpers (fake_tensorrt) live in tests/
    print(json.dumps({"all": check_all, "aot": check_aot, "no-triton": check_no_triton}[sys.argv[1]]()))

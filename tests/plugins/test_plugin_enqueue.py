"""What the IPluginV3 plugins' ``enqueue`` runs (``plugins.trt_plugins.run_op``), on CPU tensors with the kernels
in Triton's interpreter: each op's Triton launcher gets the plugin's inputs, attributes and TensorRT-allocated
outputs in the right order, and writes the outputs TensorRT hands it (kv_append in place when the outputs alias
the pools, copy-then-write when they do not). ``enqueue`` itself (TensorRT's device pointers wrapped as CUDA
tensors on TensorRT's stream) needs a GPU and was not run here."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: kernels run in its interpreter

import torch  # noqa: E402

from plugin_helpers import PagedBatch, assert_close, interpreted  # noqa: E402


def kernels():
    """The kernel modules under the interpreter, and run_op (which imports them from sys.modules)."""
    mods = {name: interpreted(name) for name in ("paged_attention", "kv_append", "draft_verify",
                                                 "confidence_unmask")}
    from trimode.plugins import trt_plugins

    return mods, trt_plugins.run_op


def test_paged_attention_writes_the_output_tensorrt_gives_it():
    mods, run_op = kernels()
    gen = torch.Generator().manual_seed(0)
    batch = PagedBatch([5, 0, 9], [3, 4, 1], 4, 2, 16, 4, gen=gen)
    for causal in (1, 0):
        out = torch.full_like(batch.q, float("nan"))
        run_op("paged_attention", {"is_causal": causal, "scale": 0.25, "page_size": 4}, list(batch.args()), [out])
        want = mods["paged_attention"].paged_attention_reference(*batch.args(), bool(causal), 0.25, 4)
        assert_close(out, want, 1e-4, f"paged_attention is_causal={causal}")


def test_kv_append_in_place_and_not_aliased():
    mods, run_op = kernels()
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(5, 2, 8, generator=gen), torch.randn(5, 2, 8, generator=gen)
    pool_k, pool_v = torch.randn(6, 4, 2, 8, generator=gen), torch.randn(6, 4, 2, 8, generator=gen)
    slots = torch.tensor([3, -1, 17, 0, 22])
    want_k, want_v = pool_k.clone(), pool_v.clone()
    mods["kv_append"].kv_append_reference(k, v, want_k, want_v, slots)
    # aliased: the outputs are the pools' memory (what the engine binds)
    in_k, in_v = pool_k.clone(), pool_v.clone()
    run_op("kv_append", {}, [k, v, in_k, in_v, slots], [in_k, in_v])
    assert torch.equal(in_k, want_k) and torch.equal(in_v, want_v)
    # not aliased: the outputs get the pool, then the writes; the inputs are untouched
    in_k, in_v = pool_k.clone(), pool_v.clone()
    out_k, out_v = torch.zeros_like(pool_k), torch.zeros_like(pool_v)
    run_op("kv_append", {}, [k, v, in_k, in_v, slots], [out_k, out_v])
    assert torch.equal(out_k, want_k) and torch.equal(out_v, want_v) and torch.equal(in_k, pool_k)


def test_decision_ops_fill_their_outputs():
    mods, run_op = kernels()
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 50, generator=gen)
    drafts = logits[:, :-1].argmax(-1).int()
    drafts[1, 2] = (drafts[1, 2] + 1) % 50
    lens = torch.tensor([4, 4, 2], dtype=torch.int32)
    outs = [torch.full((3,), -7, dtype=torch.int32), torch.full((3,), -7, dtype=torch.int32)]
    run_op("draft_verify", {"mask_token_id": 3}, [drafts, logits, lens], outs)
    want = mods["draft_verify"].draft_verify_greedy_reference(drafts, logits, lens, 3)
    assert torch.equal(outs[0], want[0]) and torch.equal(outs[1], want[1]) and outs[0].tolist()[1] == 3

    p = torch.softmax(torch.randn(3, 5, 50, generator=gen), -1)
    q = torch.softmax(torch.randn(3, 4, 50, generator=gen), -1)
    u = torch.rand(3, 5, generator=gen)
    outs = [torch.full((3,), -7, dtype=torch.int32), torch.full((3,), -7, dtype=torch.int32)]
    run_op("draft_verify_sampling", {}, [drafts, lens, q, p, u], outs)
    want = mods["draft_verify"].draft_verify_sampling_reference(drafts, lens, q, p, u)
    assert torch.equal(outs[0], want[0]) and torch.equal(outs[1], want[1])

    rows = torch.randn(6, 50, generator=gen)
    masked = torch.tensor([True, False, True, True, False, True])
    outs = [torch.full((6,), -7, dtype=torch.int32), torch.full((6,), -7.0)]
    run_op("confidence_unmask", {"mask_token_id": 3}, [rows, masked], outs)
    tokens, confidence = mods["confidence_unmask"].confidence_unmask_reference(rows, masked, 3)
    assert torch.equal(outs[0], tokens) and torch.allclose(outs[1], confidence, atol=1e-6)


def test_decision_ops_take_the_empty_shapes_the_engines_feed():
    """The engines' decision tails feed empty or zero-width inputs (docs/kernels.md "Engines that decide"): no
    verifying pass (Nd = 0), passes without drafts (draft_tokens [Nd, 0], a decode batch) and no masked row
    (Q = 0). The launchers write what the references say, and nothing for empty outputs."""
    mods, run_op = kernels()
    gen = torch.Generator().manual_seed(3)
    for nd, width in ((0, 0), (0, 4), (3, 0)):
        logits = torch.randn(nd, width + 1, 50, generator=gen)
        logits[:, :, 3] += 10.0  # the mask id leads every row: excluded, the next best wins
        drafts = torch.zeros(nd, width, dtype=torch.int32)
        lens = torch.zeros(nd, dtype=torch.int32)
        outs = [torch.full((nd,), -7, dtype=torch.int32), torch.full((nd,), -7, dtype=torch.int32)]
        run_op("draft_verify", {"mask_token_id": 3}, [drafts, logits, lens], outs)
        want = mods["draft_verify"].draft_verify_greedy_reference(drafts, logits, lens, 3)
        assert torch.equal(outs[0], want[0]) and torch.equal(outs[1], want[1]), (nd, width)
        assert all(a == 1 for a in outs[0].tolist()) and 3 not in outs[1].tolist()
    outs = [torch.zeros(0, dtype=torch.int32), torch.zeros(0)]
    run_op("confidence_unmask", {"mask_token_id": 3}, [torch.zeros(0, 50), torch.zeros(0, dtype=torch.bool)], outs)
    assert outs[0].shape == (0,) and outs[1].shape == (0,)

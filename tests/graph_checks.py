"""Run an engine directory's graphs against the torch runtime on the same inputs: a page pool holding several
sequences of different lengths, then one batch of passes per engine kind (logits and the updated pool)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from trimode.runtime.executors.onnx_executor import graph_feeds
from trimode.runtime.executors.torch_executor import TorchExecutor
from trimode.runtime.kv_cache import PagedKVCache
from trimode.runtime.passes import PassKind, SeqPass

PREFIX_LENGTHS = (5, 11, 2)  # committed tokens per sequence: pages partly filled, different lengths


def filled_cache(model, page_size: int, seed: int = 0) -> tuple[PagedKVCache, TorchExecutor]:
    cfg = model.config
    cache = PagedKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 64, page_size)
    ex = TorchExecutor(model, cache)
    gen = torch.Generator().manual_seed(seed)
    for s, n in enumerate(PREFIX_LENGTHS):
        cache.add_sequence(s)
        cache.reserve(s, n + 12)
        ids = tuple(torch.randint(4, cfg.vocab_size, (n,), generator=gen).tolist())
        ex.forward([SeqPass(s, PassKind.PREFILL, ids, 0)])
        cache.set_length(s, n)
    return cache, ex


def kind_passes(kind: str, vocab: int, seed: int = 1) -> list[SeqPass]:
    gen = torch.Generator().manual_seed(seed)
    tokens = {"prefill": (3, 1, 4), "decode": (1, 1, 1), "draft": (4, 4, 4), "verify": (4, 4, 4)}[kind]
    pk = {"prefill": PassKind.PREFILL, "decode": PassKind.DECODE, "draft": PassKind.DRAFT,
          "verify": PassKind.VERIFY}[kind]
    out = []
    for s, (n, start) in enumerate(zip(tokens, PREFIX_LENGTHS)):
        ids = tuple(torch.randint(4, vocab, (n,), generator=gen).tolist())
        num_logits = n if kind in ("draft", "verify") else 1
        out.append(SeqPass(s, pk, ids, start, num_logits, use_lora=kind == "draft" and s != 1))
    return out


def run_graph(path: Path, passes, cache: PagedKVCache, session=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and the updated K pool [layers, ...] (None if the graph keeps nothing); the cache is not changed."""
    if session is None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    unified = "is_causal" in names  # one graph for every kind: the passes' kind decides what is written
    keeps = passes[0].kind.keeps_kv if unified else "slot_mapping" in names
    feeds = graph_feeds(passes, cache, keeps, "lora_mask" in names)
    layers = cache.k_pool.shape[0]
    for layer in range(layers):
        feeds[f"k_pool.{layer}"] = cache.k_pool[layer].numpy().copy()
        feeds[f"v_pool.{layer}"] = cache.v_pool[layer].numpy().copy()
    if unified:
        feeds["is_causal"] = np.array(passes[0].kind.is_causal)
        if "slot_mapping" not in feeds:
            feeds["slot_mapping"] = np.full(len(feeds["input_ids"]), -1, np.int64)
        feeds.setdefault("lora_mask", np.zeros(len(feeds["input_ids"]), np.float32))
    outs = session.run(None, {k: v for k, v in feeds.items() if k in names})
    out_names = [o.name for o in session.get_outputs()]
    pool = None
    if "k_pool_out.0" in out_names:
        pool = torch.stack([torch.from_numpy(outs[out_names.index(f"k_pool_out.{i}")]) for i in range(layers)])
    return torch.from_numpy(outs[0]), pool


def torch_reference(ex: TorchExecutor, passes) -> tuple[torch.Tensor, torch.Tensor]:
    cache = ex.cache
    k0, v0 = cache.k_pool.clone(), cache.v_pool.clone()
    logits = torch.cat([o.logits for o in ex.forward(passes)])
    k_after = cache.k_pool.clone()
    cache.k_pool.copy_(k0)
    cache.v_pool.copy_(v0)
    return logits, k_after


def compare_kinds(engine_dir: Path, model, form: str = "reference", session_factory=None) -> dict:
    """{kind: (max |logits - torch|, max |pool - torch pool|, max |logits|, max |pool|)} for every kind of the
    engine directory."""
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    cache, ex = filled_cache(model, manifest["shapes"]["page_size"])
    errors = {}
    for kind, files in manifest["engine_kinds"].items():
        passes = kind_passes(kind, model.config.vocab_size)
        want, want_pool = torch_reference(ex, passes)
        path = engine_dir / "onnx" / files[form]
        session = session_factory(path) if session_factory else None
        got, pool = run_graph(path, passes, cache, session)
        pool_err = 0.0 if pool is None else (pool - want_pool).abs().max().item()
        errors[kind] = ((got - want).abs().max().item(), pool_err, want.abs().max().item(),
                        want_pool.abs().max().item())
    return errors


def plugin_nodes(path: Path) -> list[onnx.NodeProto]:
    model = onnx.load(str(path), load_external_data=False)
    nodes = list(model.graph.node)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes += list(attr.g.node)
    return [n for n in nodes if n.domain == "trimode"]

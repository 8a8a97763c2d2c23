"""One switch between the Triton kernels and the torch references, for every op of docs/kernels.md.

``backend`` (per call) or the ``TRIMODE_KERNELS`` environment variable chooses: ``auto`` (default: kernels on CUDA
tensors when Triton is importable, references otherwise), ``reference`` (references on any device) or
``triton`` (kernels on any device: CPU tensors then need ``TRITON_INTERPRET=1`` set before the kernel modules are
imported, as the interpreter tests do). The kernel modules are imported on first use, so importing
``trimode.plugins`` (and the runtime) imports neither Triton nor the kernels.
"""

import importlib
import os
from typing import Optional, Tuple

import torch

ENV_VAR = "TRIMODE_KERNELS"
BACKENDS = ("auto", "reference", "triton")
_HAS_TRITON: Optional[bool] = None


def triton_available() -> bool:
    global _HAS_TRITON
    if _HAS_TRITON is None:
        try:
            import triton  # noqa: F401
            _HAS_TRITON = True
        except ImportError:
            _HAS_TRITON = False
    return _HAS_TRITON


def resolve_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """'reference' or 'triton' for tensors on ``device`` (see the module docstring)."""
    choice = backend or os.environ.get(ENV_VAR) or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r} (from {'the argument' if backend else ENV_VAR}); "
                         f"choose one of {BACKENDS}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if choice == "triton" and not triton_available():
        raise RuntimeError(f"kernel backend 'triton' was asked for ({ENV_VAR} or argument) but triton is not "
                           "installed: pip install triton, or use 'reference'")
    return choice


def _module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def paged_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor,
                    v_pool: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                    query_start: torch.Tensor, is_causal: bool, scale: float, page_size: Optional[int] = None, *,
                    backend: Optional[str] = None, max_query_len: Optional[int] = None,
                    max_context_len: Optional[int] = None) -> torch.Tensor:
    """out [T_total, Hq, D]. The ``max_*`` hints (host ints) spare the kernel launcher a device sync."""
    mod = _module("paged_attention")
    args = (q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, query_start, is_causal, scale, page_size)
    if resolve_backend(q.device, backend) == "reference":
        return mod.paged_attention_reference(*args)
    return mod.paged_attention_triton(*args, max_query_len=max_query_len, max_context_len=max_context_len)


def kv_append(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
              slot_mapping: torch.Tensor, *, backend: Optional[str] = None) -> None:
    """Write rows of k/v_new to their slots (slot -1: skipped), in place."""
    mod = _module("kv_append")
    fn = mod.kv_append_reference if resolve_backend(k_new.device, backend) == "reference" else mod.kv_append_triton
    fn(k_new, v_new, k_pool, v_pool, slot_mapping)


def draft_verify(draft_tokens: torch.Tensor, target_logits: torch.Tensor, draft_lens: torch.Tensor,
                 mask_token_id: int, *, backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: (accepted, bonus) int32 [num_seqs]."""
    mod = _module("draft_verify")
    fn = (mod.draft_verify_greedy_reference if resolve_backend(target_logits.device, backend) == "reference"
          else mod.draft_verify_greedy_triton)
    return fn(draft_tokens, target_logits, draft_lens, mask_token_id)


def draft_verify_sampling(draft_tokens: torch.Tensor, draft_lens: torch.Tensor, draft_probs: torch.Tensor,
                          target_probs: torch.Tensor, uniforms: torch.Tensor, *, backend: Optional[str] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rejection-sampling verification: (accepted, bonus) int32 [num_seqs]."""
    mod = _module("draft_verify")
    fn = (mod.draft_verify_sampling_reference if resolve_backend(target_probs.device, backend) == "reference"
          else mod.draft_verify_sampling_triton)
    return fn(draft_tokens, draft_lens, draft_probs, target_probs, uniforms)


def confidence_unmask(logits: torch.Tensor, is_masked: torch.Tensor, mask_token_id: int, *,
                      backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens int32 [N], confidence fp32 [N]) of the masked rows (-1 / 0 elsewhere)."""
    mod = _module("confidence_unmask")
    fn = (mod.confidence_unmask_reference if resolve_backend(logits.device, backend) == "reference"
          else mod.confidence_unmask_triton)
    return fn(logits, is_masked, mask_token_id)


def reveal(confidence: torch.Tensor, is_masked: torch.Tensor, policy: str, threshold: Optional[float],
           num_to_reveal: torch.Tensor, is_last_step: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Bool [num_seqs, B]: the masked positions to reveal now (policies of runtime.unmasking)."""
    mod = _module("confidence_unmask")
    fn = mod.reveal_reference if resolve_backend(confidence.device, backend) == "reference" else mod.reveal_triton
    return fn(confidence, is_masked, policy, threshold, num_to_reveal, is_last_step)


def register_tensorrt_plugins() -> None:
    """Register every ``trimode::*`` plugin with TensorRT's ``tensorrt.plugin`` registry. Needs TensorRT (>= 10.9,
    written for 11) and Triton; could not be run on the project's CPU machines."""
    for name in ("paged_attention", "kv_append", "draft_verify", "confidence_unmask"):
        _module(name).register_tensorrt_plugin()

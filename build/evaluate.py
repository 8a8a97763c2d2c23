"""Quality of a quantized checkpoint against its unquantized source: greedy agreement and perplexity.

    python -m trimode.build.evaluate --reference models/tiny-kjv --quantized engines/x-fp8/checkpoint \\
        --text-file heldout.txt [--num-prompts 16 --prompt-len 32 --new-tokens 32]

- ``agreement``: generate ``new_tokens`` greedily (AR) with both models from the same prompts; the fraction of
  positions where the quantized model's token equals the reference's (free-running: after a divergence the
  contexts differ, so this is the strict number).
- ``agreement_teacher_forced``: the fraction of the reference's generated positions where the quantized
  model's argmax, given the reference's own prefix, is the reference's token (the per-step agreement).
- ``ppl`` / ``ppl_delta``: perplexity of both models on the evaluation windows (causal, next-token).
Prompts and windows are cut evenly from the text; pass text the calibration did not see.

``--control`` adds one row that quantizes nothing: the reference checkpoint computed in bfloat16 instead of
float32 (what a bf16 deployment computes). Its agreement is the floor set by the model's own near-tied logits:
no quantized model can be expected to agree with the reference much better than the reference agrees with
itself at another precision.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from trimode.runtime.api import TriModeLM
from trimode.runtime.model.checkpoint import load_model, load_tokenizer
from trimode.runtime.model.network import NLDModel, causal_mask
from trimode.runtime.model.quantized import load_quantized_model
from trimode.runtime.settings import DEFAULTS


def windows(ids: list[int], num: int, length: int) -> list[list[int]]:
    if len(ids) < length:
        raise ValueError(f"evaluation text has {len(ids)} tokens, fewer than one window of {length}")
    last = len(ids) - length
    return [ids[round(i * last / max(num - 1, 1)):][:length] for i in range(num)]


@torch.no_grad()
def _logits(model: NLDModel, ids: list[int]) -> torch.Tensor:
    x = torch.tensor(ids)[None]
    return model.forward_dense(x, torch.arange(len(ids))[None], causal_mask(len(ids)))[0].float()


def greedy(model: NLDModel, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy AR continuations of all prompts in one batch (the runtime's engine and paged KV cache)."""
    page_size = DEFAULTS.page_size
    pages_per_seq = -(-(max(map(len, prompts)) + new_tokens + 1) // page_size)
    lm = TriModeLM(model, None, num_pages=len(prompts) * pages_per_seq + 8, page_size=page_size)
    results = lm.ar_generate([list(p) for p in prompts], max_new_tokens=new_tokens, eos_token_ids=())
    return [list(r.token_ids) for r in results]


@torch.no_grad()
def perplexity(model: NLDModel, seqs: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for ids in seqs:
        logits = _logits(model, ids)[:-1]
        nll += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        n += len(ids) - 1
    return math.exp(nll / n)


def compare(reference: NLDModel, quantized: NLDModel, ids: list[int], num_prompts: int = 16, prompt_len: int = 32,
            new_tokens: int = 32, ppl_len: int = 128) -> dict[str, float]:
    prompts = windows(ids, num_prompts, prompt_len)
    same = same_tf = total = 0
    refs, gots = greedy(reference, prompts, new_tokens), greedy(quantized, prompts, new_tokens)
    for prompt, ref, got in zip(prompts, refs, gots):
        same += sum(a == b for a, b in zip(ref, got))
        logits = _logits(quantized, prompt + ref[:-1])[len(prompt) - 1:]
        logits[:, reference.config.mask_token_id] = float("-inf")
        same_tf += int((logits.argmax(-1) == torch.tensor(ref)).sum())
        total += len(ref)
    seqs = windows(ids, max(4, num_prompts // 2), ppl_len)
    ppl_ref, ppl_q = perplexity(reference, seqs), perplexity(quantized, seqs)
    return {"agreement": same / total, "agreement_teacher_forced": same_tf / total, "tokens": total,
            "ppl_reference": ppl_ref, "ppl": ppl_q, "ppl_delta": ppl_q - ppl_ref}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trimode.build.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--reference", type=Path, required=True)
    p.add_argument("--quantized", type=Path, nargs="+", required=True)
    p.add_argument("--text-file", type=Path, required=True)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--control", action="store_true", help="also compare the reference computed in bfloat16")
    p.add_argument("--weights-only", action="store_true",
                   help="quantized weights, float activations and KV (isolates the weight rounding)")
    a = p.parse_args(argv)
    reference = load_model(a.reference, dtype="float32")
    ids = load_tokenizer(a.reference, reference.config).encode(a.text_file.read_text(encoding="utf-8"))
    if a.control:
        result = compare(reference, load_model(a.reference, dtype="bfloat16"), ids, a.num_prompts, a.prompt_len,
                         a.new_tokens)
        print(json.dumps({"quantized": "control: reference in bfloat16", **{k: round(v, 4) for k, v in
                                                                            result.items()}}))
    for q in a.quantized:
        model = load_quantized_model(q, simulate_activations=False) if a.weights_only else load_model(q)
        result = compare(reference, model, ids, a.num_prompts, a.prompt_len, a.new_tokens)
        label = q.as_posix() + (" (weights only)" if a.weights_only else "")
        print(json.dumps({"quantized": label, **{k: round(v, 4) for k, v in result.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

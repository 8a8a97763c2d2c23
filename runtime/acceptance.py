"""Draft acceptance for self-speculation: pure tensor functions.

``greedy_accept``: the longest prefix of the draft that equals the target's greedy tokens, plus one bonus
token (the target's token at the first mismatch, or after the last draft). Lossless at T = 0.

``rejection_accept``: speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023): draft token
d_i, drawn from q_i, is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection a
token is drawn from norm(max(0, p_i - q_i)); if all drafts are accepted the bonus is drawn from the last p.
The emitted tokens are then distributed exactly as sampling from p token by token.
"""

from __future__ import annotations

import torch

from trimode.runtime.sampling import sample_from


def greedy_accept(draft: list[int], target: list[int]) -> int:
    """Number of tokens to emit: 1 + length of the leading run where target[i] == draft[i]."""
    assert len(target) == len(draft) + 1, (len(target), len(draft))
    n = 0
    while n < len(draft) and target[n] == draft[n]:
        n += 1
    return n + 1


def rejection_accept(draft: list[int], q: torch.Tensor, p: torch.Tensor,
                     generator: torch.Generator | None) -> list[int]:
    """Tokens to emit. draft: k tokens; q: [k, V] draft distributions; p: [k + 1, V] target distributions."""
    assert q.shape[0] == len(draft) and p.shape[0] == len(draft) + 1, (q.shape, p.shape, len(draft))
    out: list[int] = []
    for i, d in enumerate(draft):
        u = torch.rand((), generator=generator).item()
        if u * float(q[i, d]) <= float(p[i, d]):  # accept with probability min(1, p/q)
            out.append(d)
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = residual.sum()
        # q == p on the support would make the residual empty; p itself is then the right law
        residual = residual / total if total > 0 else p[i]
        out.append(int(sample_from(residual[None], generator)[0]))
        return out
    out.append(int(sample_from(p[-1][None], generator)[0]))
    return out

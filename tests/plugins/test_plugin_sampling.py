"""draft_verify and confidence_unmask (with the reveal rule): references against the runtime's pure functions,
kernels (in Triton's interpreter) against the references, and the rejection sampler's output distribution."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: kernels run in its interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

from trimode.plugins.confidence_unmask import confidence_unmask_reference, reveal_reference  # noqa: E402
from trimode.plugins.draft_verify import draft_verify_greedy_reference, draft_verify_sampling_reference  # noqa: E402
from trimode.runtime.acceptance import greedy_accept  # noqa: E402
from trimode.runtime.sampling import SamplingParams, select_tokens  # noqa: E402
from trimode.runtime.unmasking import reveal as runtime_reveal, token_confidence  # noqa: E402

from plugin_helpers import interpreted  # noqa: E402

MASK = 3


def greedy_case(num_seqs=6, block=5, vocab=300):
    """Logits with ties (integer values), the mask token often the largest, drafts matching for a random run."""
    logits = torch.randint(-4, 5, (num_seqs, block, vocab)).float()
    logits[:, ::2, MASK] = 10.0  # the mask id must never be chosen
    target = logits.clone().index_fill_(-1, torch.tensor([MASK]), float("-inf")).argmax(-1)
    draft = target[:, :-1].clone()
    for s in range(num_seqs):  # break the match at a random place (or never)
        cut = int(torch.randint(0, block, ()))
        if cut < block - 1:
            draft[s, cut] = (draft[s, cut] + 1 + int(torch.randint(0, vocab - 1, ()))) % vocab
    lens = torch.randint(0, block, (num_seqs,), dtype=torch.int32)
    lens[0] = block - 1
    return draft.int(), logits, lens


def test_greedy_reference_agrees_with_runtime_acceptance():
    draft, logits, lens = greedy_case(num_seqs=40)
    accepted, bonus = draft_verify_greedy_reference(draft, logits, lens, MASK)
    for s in range(draft.shape[0]):
        n = int(lens[s])
        target = select_tokens(logits[s, :n + 1], SamplingParams(), MASK, None).tolist()
        emitted = target[:greedy_accept(draft[s, :n].tolist(), target)]
        assert int(accepted[s]) == len(emitted) and int(bonus[s]) == emitted[-1], f"sequence {s}"
        assert draft[s, :len(emitted) - 1].tolist() == emitted[:-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_kernel_matches_reference(dtype):
    mod = interpreted("draft_verify")
    draft, logits, lens = greedy_case(vocab=5000 if dtype == torch.float32 else 300)  # 5000: several V tiles
    want = draft_verify_greedy_reference(draft, logits.to(dtype), lens, MASK)
    got = mod.draft_verify_greedy_triton(draft, logits.to(dtype), lens, MASK)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"kernel {got} vs reference {want}"


def sampling_case(num_seqs, block, vocab, gen=None):
    p = torch.rand(num_seqs, block, vocab, generator=gen).pow(3)
    p = p / p.sum(-1, keepdim=True)
    q = torch.rand(num_seqs, block - 1, vocab, generator=gen).pow(3)
    q = q / q.sum(-1, keepdim=True)
    draft = torch.multinomial(q.reshape(-1, vocab), 1, generator=gen).view(num_seqs, block - 1).int()
    return draft, p, q


def test_sampling_kernel_matches_reference():
    mod = interpreted("draft_verify")
    draft, p, q = sampling_case(24, 4, 37)
    q[0] = p[0, :3]  # q == p: every draft is accepted
    lens = torch.randint(0, 4, (24,), dtype=torch.int32)
    uniforms = torch.rand(24, 4)
    want = draft_verify_sampling_reference(draft, lens, q, p, uniforms)
    got = mod.draft_verify_sampling_triton(draft, lens, q, p, uniforms)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"kernel {got} vs reference {want}"


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_rejection_sampling_reproduces_the_target_distribution():
    """Context-free target p_i and drafter q_i far from it: emitted token i must be distributed as p_i."""
    gen = torch.Generator().manual_seed(1234)
    trials, vocab, block = 6000, 6, 3
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [0.05, 0.05, 0.1, 0.1, 0.2, 0.5],
                      [0.3, 0.1, 0.1, 0.1, 0.1, 0.3]])
    q = torch.tensor([[0.02, 0.03, 0.05, 0.1, 0.3, 0.5], [0.6, 0.2, 0.1, 0.05, 0.03, 0.02]])
    draft = torch.stack([torch.multinomial(q[i], trials, replacement=True, generator=gen) for i in range(2)], 1)
    accepted, bonus = draft_verify_sampling_reference(
        draft.int(), torch.full((trials,), block - 1, dtype=torch.int32), q.expand(trials, -1, -1),
        p.expand(trials, -1, -1), torch.rand(trials, block, generator=gen))
    emitted = torch.cat([draft, torch.zeros(trials, 1, dtype=torch.long)], 1)
    emitted[torch.arange(trials), accepted.long() - 1] = bonus.long()
    critical = 20.52  # chi-square, 5 degrees of freedom, p = 0.001
    for i in range(block):
        rows = accepted > i  # trials that emitted a token at position i
        counts = torch.bincount(emitted[rows, i], minlength=vocab).double()
        stat = chi_square(counts, p[i].double())
        assert stat < critical, f"position {i}: chi-square {stat:.1f} over {int(rows.sum())} draws, counts {counts}"
    assert 0.2 < accepted.float().mean() - 1 < 1.5, "the drafter should be accepted sometimes, not always"


def test_confidence_reference_agrees_with_runtime():
    logits = torch.randn(9, 512) * 3
    logits[0, MASK] = 50.0  # the mask id is excluded from the argmax, not from the softmax
    is_masked = torch.rand(9) > 0.3
    is_masked[0] = True
    tokens, confidence = confidence_unmask_reference(logits, is_masked, MASK)
    want_tokens = select_tokens(logits, SamplingParams(), MASK, None)
    want_conf = token_confidence(logits, want_tokens)
    assert torch.equal(tokens[is_masked].long(), want_tokens[is_masked])
    assert torch.equal(confidence[is_masked], want_conf[is_masked])
    assert (tokens[~is_masked] == -1).all() and (confidence[~is_masked] == 0).all()


@pytest.mark.parametrize("dtype,vocab", [(torch.float32, 5000), (torch.bfloat16, 700)])
def test_confidence_kernel_matches_reference(dtype, vocab):
    mod = interpreted("confidence_unmask")
    logits = (torch.randn(7, vocab) * 4).round().to(dtype)  # rounded: many ties
    logits[1, MASK] = 99.0
    is_masked = torch.tensor([True, True, False, True, True, False, True])
    want_tokens, want_conf = confidence_unmask_reference(logits, is_masked, MASK)
    tokens, conf = mod.confidence_unmask_triton(logits, is_masked, MASK)
    assert torch.equal(tokens, want_tokens), f"tokens {tokens} vs {want_tokens}"
    err = (conf - want_conf).abs().max().item()
    assert err <= 1e-5 * max(want_conf.abs().max().item(), 1e-30), \
        f"confidence: max abs error {err:.2e}, mean {(conf - want_conf).abs().mean().item():.2e}"


def reveal_case(num_seqs=12, block=8):
    confidence = torch.randint(0, 5, (num_seqs, block)).float() / 4  # coarse: ties
    is_masked = torch.rand(num_seqs, block) > 0.35
    is_masked[0] = False  # nothing to reveal
    num_to_reveal = torch.randint(0, 4, (num_seqs,))
    is_last_step = torch.rand(num_seqs) > 0.8
    return confidence, is_masked, num_to_reveal, is_last_step


@pytest.mark.parametrize("policy", ["threshold", "topk", "leftmost"])
def test_reveal_reference_agrees_with_runtime(policy):
    confidence, is_masked, num_to_reveal, is_last_step = reveal_case(num_seqs=60)
    got = reveal_reference(confidence, is_masked, policy, 0.5, num_to_reveal, is_last_step)
    for s in range(confidence.shape[0]):
        want = runtime_reveal(confidence[s], is_masked[s], policy, 0.5, int(num_to_reveal[s]), bool(is_last_step[s]))
        assert torch.equal(got[s], want), f"{policy} row {s}: {got[s].tolist()} vs runtime {want.tolist()}"


@pytest.mark.parametrize("policy", ["threshold", "topk", "leftmost"])
def test_reveal_kernel_matches_reference(policy):
    mod = interpreted("confidence_unmask")
    args = reveal_case()
    want = reveal_reference(args[0], args[1], policy, 0.5, args[2], args[3])
    got = mod.reveal_triton(args[0], args[1], policy, 0.5, args[2], args[3])
    assert torch.equal(got, want), f"{policy}: kernel {got.int()} vs reference {want.int()}"

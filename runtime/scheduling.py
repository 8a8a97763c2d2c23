"""Mode ``auto``: at each step boundary, choose AR, linear or fused self-speculation and the block length for
every ``auto`` sequence of the running batch, from measured pass costs and each sequence's live acceptance.

Model (one decision per step, no forward needed to decide):

- Cost. A forward over N sequences costs ``c(kind, N, T)`` ms when each holds T new tokens (the pass-cost
  profile, runtime.profiling, measured on this machine and executor: ``PassCostTable``). In a mixed batch a
  sequence's share of the forward is ``c(kind, N, T_i) / N``; the step costs the sum of the shares. A spec
  sequence alternates a draft and a verify pass of B tokens: its share per step is the mean of the two. A fused
  spec sequence runs one forward of B x (1 + K) tokens per step (chain and K sub-blocks of B), costed as one
  verify pass of that many tokens; a sequence entering it first drafts linearly (a draft pass of B, then a
  fused forward judging those drafts), so entering is valued over that and the ``ENTRY_HORIZON`` fused steps
  after it.
- Tokens. An AR sequence emits 1 token per step. A spec sequence with per-draft acceptance probability a emits
  ``E(B) = 1 + a + ... + a^(B-1) = (1 - a^B) / (1 - a)`` tokens per draft/verify cycle (the expected accepted
  length of a geometric acceptance model: Leviathan et al., "Fast Inference from Transformers via Speculative
  Decoding", 2023, eq. 1), i.e. ``E(B) / 2`` per step, at most what it still has to generate; fused spec
  ``E(B)`` per step at the acceptance of its own drafts (estimated apart: drafted before their seed is known,
  they are accepted less).
- Objective. Maximise the batch's expected tokens per ms. For each block length B, switching a sequence from AR
  to spec adds the same cost and ``E(B) / 2 - 1`` tokens, so the best k to switch are the k largest gains; the
  best (B, k) wins (O(len(block_lengths) x batch log batch) arithmetic; optimal among assignments that share
  one B, which the tests check against brute force). Sequences in the middle of a cycle, and requests in other modes,
  enter as fixed tokens and costs.
- Acceptance. Each ``auto`` sequence keeps an exponentially weighted count of draft positions accepted and
  rejected at its verifies (``AcceptanceEstimate``, one for linear and one for fused drafts), starting from a
  prior; while it decodes in AR the counts
  decay back towards the prior, so a sequence that left speculation tries it again later.

Correctness does not depend on any of this: the choice only picks among lossless modes (greedy spec equals
greedy AR; sampled spec keeps the AR distribution by rejection sampling), at step boundaries, on one KV cache.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

# fused spec's drafts are made before their seed is known: until its own verifies are seen, a sequence's fused
# acceptance is assumed well below the linear prior (AcceptanceEstimate.prior), so it is not entered on hope
FUSED_PRIOR = 0.35
_log = logging.getLogger("trimode")
ENTRY_HORIZON = 4  # fused spec is entered for the steps that follow, not just the first (a linear draft's)
COSTS_FILE = "pass_costs.{executor}.json"  # beside the checkpoint or engine directory: trimode profile --save


class CostTableError(ValueError):
    """A pass-cost table that cannot be used: malformed, or without a pass kind that is looked up."""


REQUIRED_KINDS = ("decode", "verify", "draft")  # what auto's decisions look up (others fall back to these)


class CostLookup(Protocol):
    def cost_ms(self, kind: str, batch: int, num_tokens: int) -> float: ...


class PassCostTable:
    """Pass costs read back from a profile (``runtime.profiling.profile`` result or its JSON): ``cost_ms(kind,
    batch, num_tokens)`` interpolates the median ms log-linearly in T and in the batch between measured points
    (below the measured range: its lowest point; above it: in proportion, so an unmeasured long pass is never
    taken for cheap). ``source``: where it came from (for logs)."""

    def __init__(self, points: dict[tuple[str, int, int], float], source: str = "profile",
                 meta: dict[str, Any] | None = None) -> None:
        self.points, self.source, self.meta = points, source, meta or {}
        self._memo: dict[tuple[str, int, int], float] = {}  # lookups repeat every step: computed once

    @classmethod
    def from_result(cls, result: dict[str, Any], source: str = "profile") -> "PassCostTable":
        """The table of a ``runtime.profiling.profile`` result. Raises ``CostTableError`` naming ``source`` for a
        result without the rows mode auto needs (``REQUIRED_KINDS`` with positive medians) or a malformed row."""
        try:
            points = {(str(r["kind"]), int(r["batch"]), int(r["num_tokens"])): float(r["median_ms"])
                      for r in result["passes"]}
        except (KeyError, TypeError, ValueError) as e:
            raise CostTableError(f"{source}: not a pass-cost profile ({type(e).__name__}: {e}); write it with "
                                 f"trimode profile --save") from None
        missing = [k for k in REQUIRED_KINDS if not any(kind == k for kind, _, _ in points)]
        if missing or any(not ms > 0 for ms in points.values()):
            raise CostTableError(f"{source}: pass costs need positive medians for {list(REQUIRED_KINDS)}; "
                                 f"missing {missing or 'none'} (trimode profile --save measures them)")
        return cls(points, source, result.get("meta"))

    @classmethod
    def from_json(cls, path: str | Path) -> "PassCostTable":
        """``from_result`` of a profile JSON file. Raises ``CostTableError`` for a file that is not one."""
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise CostTableError(f"{path}: cannot read pass costs ({e})") from None
        return cls.from_result(result, str(path))

    def cost_ms(self, kind: str, batch: int, num_tokens: int) -> float:
        """Median ms of a forward of ``batch`` passes of ``kind`` with ``num_tokens`` each (decode: T = 1).
        Raises ``CostTableError`` naming what the table holds for a kind it does not hold."""
        key = (kind, batch, num_tokens)
        if key not in self._memo:
            self._memo[key] = self._lookup(kind, batch, num_tokens)
        return self._memo[key]

    def _lookup(self, kind: str, batch: int, num_tokens: int) -> float:
        batches = sorted({b for k, b, _ in self.points if k == kind})
        if not batches:
            raise CostTableError(f"no {kind!r} passes in this profile; it holds {sorted({k for k, _, _ in self.points})}")

        def along_t(b: int) -> float:
            return _interpolate({t: ms for (k, bb, t), ms in self.points.items() if k == kind and bb == b},
                                num_tokens)
        return _interpolate({b: along_t(b) for b in batches}, batch)

    def ratio(self, kind: str, batch: int, num_tokens: int) -> float:
        """c(T)/c(1): ``cost_ms(kind, batch, T)`` over the decode pass at the same batch."""
        return self.cost_ms(kind, batch, num_tokens) / self.cost_ms("decode", batch, 1)


def _interpolate(values: dict[int, float], x: int) -> float:
    """Piecewise linear in log x between the measured keys; below them the smallest, above them in proportion
    to x (a pass or batch larger than any measured is assumed to cost as much more as it holds: never cheap)."""
    keys = sorted(values)
    if x <= keys[0]:
        return values[keys[0]]
    if x >= keys[-1]:
        return values[keys[-1]] * x / keys[-1]
    hi = next(k for k in keys if k >= x)
    lo = keys[keys.index(hi) - 1]
    w = (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return values[lo] + w * (values[hi] - values[lo])


class DefaultCosts:
    """The built-in, conservative cost model used when this machine's costs were not measured: a pass of T tokens
    per sequence costs ``1 + (T - 1) / 4`` decode passes, at any batch (between a GPU's nearly flat c(T) and a
    CPU's nearly linear one), so speculation is chosen only where acceptance is high."""

    source = "built-in default (measure: trimode profile --model DIR --save)"

    def cost_ms(self, kind: str, batch: int, num_tokens: int) -> float:
        return float(batch) * (1.0 + (num_tokens - 1) / 4.0)


def load_costs(directory: str | Path | None, executor: str) -> PassCostTable | None:
    """The pass costs measured for ``executor`` and stored beside a checkpoint or engine directory
    (``pass_costs.<executor>.json``, written by ``trimode profile --save``), or None when there are none. A file
    that is not a usable table is reported in one log line and ignored (the runtime still loads; mode auto then
    uses ``DefaultCosts``)."""
    if directory is None:
        return None
    path = Path(directory) / COSTS_FILE.format(executor=executor)
    if not path.exists():
        return None
    try:
        return PassCostTable.from_json(path)
    except CostTableError as e:
        _log.warning("trimode: ignoring %s", e)
        return None


@dataclass
class AcceptanceEstimate:
    """A sequence's per-draft acceptance probability: exponentially weighted counts of accepted and rejected draft
    positions at its verifies, on top of a prior of ``prior_weight`` positions at ``prior``; ``decay`` per
    verify, ``ar_decay`` per AR step (pulling an estimate that left speculation back towards the prior)."""

    prior: float = 0.6
    prior_weight: float = 2.0
    decay: float = 0.7
    ar_decay: float = 0.97
    accepted: float = 0.0
    trials: float = 0.0

    @property
    def value(self) -> float:
        return (self.prior * self.prior_weight + self.accepted) / (self.prior_weight + self.trials)

    def observe(self, accepted_length: int, block_length: int) -> None:
        """One verify of a block of ``block_length`` (seed + B - 1 drafts) that emitted ``accepted_length``
        tokens (accepted drafts + 1): accepted - 1 successes, and one failure unless every draft was accepted."""
        successes = accepted_length - 1
        trials = successes + (1 if successes < block_length - 1 else 0)
        self.accepted = self.accepted * self.decay + successes
        self.trials = self.trials * self.decay + trials

    def observe_ar(self) -> None:
        self.accepted *= self.ar_decay
        self.trials *= self.ar_decay


def expected_tokens(acceptance: float, block_length: int) -> float:
    """Expected tokens one draft/verify cycle of ``block_length`` emits at per-draft acceptance ``acceptance``:
    (1 - a^B) / (1 - a) (B when a = 1)."""
    a = min(max(acceptance, 0.0), 1.0)
    return float(block_length) if a >= 1.0 else (1.0 - a ** block_length) / (1.0 - a)


@dataclass
class Candidate:
    """One ``auto`` sequence at a step boundary: its acceptance estimates (linear spec's drafts, fused spec's
    sub-block drafts) and the tokens it still has to make."""

    acceptance: float
    remaining: int
    fused_acceptance: float | None = None
    in_fused: bool = False  # its drafts for the next step come from fused spec's sub-blocks already


Choice = tuple[str, int]  # ("spec", B) or ("fused_spec", B)


@dataclass
class Decision:
    """Per candidate (in the order given): None for AR, else the mode and block length; and the model's expected
    tokens per ms of the whole batch for it."""

    choices: list[Choice | None]
    tokens_per_ms: float

    @property
    def block_lengths(self) -> list[int | None]:
        """The block length of each choice (None: AR)."""
        return [None if c is None else c[1] for c in self.choices]


def decide(candidates: Sequence[Candidate], batch: int, costs: CostLookup, block_lengths: Sequence[int],
           fixed_tokens: float = 0.0, fixed_ms: float = 0.0, fused_subblocks: int = 0) -> Decision:
    """The choice that maximises expected tokens per ms of a step (module docstring). ``batch``: sequences in the
    forward (the candidates and every other running sequence); ``fixed_tokens`` / ``fixed_ms``: the expected
    tokens and cost share of the sequences that do not decide now. ``fused_subblocks`` > 0 also weighs fused spec
    with that many sub-blocks of B (one forward of B x (1 + K) tokens per step, ``E(B)`` tokens at the
    candidate's ``fused_acceptance``). Raises ``ValueError`` for no block length."""
    if not block_lengths:
        raise ValueError("block_lengths must hold at least one block length")
    n = max(batch, 1)
    ar_ms = costs.cost_ms("decode", n, 1) / n
    best = Decision([None] * len(candidates), 0.0)
    best.tokens_per_ms = (fixed_tokens + len(candidates)) / max(fixed_ms + len(candidates) * ar_ms, 1e-12)
    options: list[tuple[Choice, list[float], list[float]]] = []  # (choice, per candidate: added ms, gained tokens)
    for b in block_lengths:
        # tokens per step a sequence gains over AR by taking the option, and the cost it adds
        spec_ms = (costs.cost_ms("draft", n, b) + costs.cost_ms("verify", n, b)) / (2 * n)
        options.append((("spec", b), [spec_ms - ar_ms] * len(candidates),
                        [min(expected_tokens(c.acceptance, b), max(c.remaining, 1)) / 2 - 1 for c in candidates]))
        if fused_subblocks > 0:
            fused_ms = costs.cost_ms("verify", n, b * (1 + fused_subblocks)) / n
            draft_ms = costs.cost_ms("draft", n, b) / n
            h = ENTRY_HORIZON  # entering: a linear draft, a fused forward judging it, then h fused steps
            added, gained = [], []
            for c in candidates:
                fused_tokens = min(expected_tokens(c.fused_acceptance if c.fused_acceptance is not None
                                                   else c.acceptance, b), max(c.remaining, 1))
                if c.in_fused:
                    added.append(fused_ms - ar_ms)
                    gained.append(fused_tokens - 1)
                else:
                    linear_tokens = min(expected_tokens(c.acceptance, b), max(c.remaining, 1))
                    added.append((draft_ms + (1 + h) * fused_ms) / (2 + h) - ar_ms)
                    gained.append((linear_tokens + h * fused_tokens) / (2 + h) - 1)
            options.append((("fused_spec", b), added, gained))
    for choice, added_ms, gain in options:
        # the best k to switch are the k largest gains (all add the same cost; else: the best gain per cost)
        if len(set(added_ms)) == 1:
            order = sorted(range(len(candidates)), key=lambda i: -gain[i])
        else:
            order = sorted(range(len(candidates)),
                           key=lambda i: -(gain[i] / max(added_ms[i], 1e-12) if added_ms[i] > 0 else gain[i] * 1e12))
        tokens, ms = fixed_tokens + len(candidates), fixed_ms + len(candidates) * ar_ms
        rate = tokens / max(ms, 1e-12)
        for k, i in enumerate(order, start=1):
            before = rate
            tokens += gain[i]
            ms += added_ms[i]
            rate = tokens / max(ms, 1e-12)
            if added_ms[i] > 0 and rate <= before:
                break  # ordered by gain per added cost: no later candidate can raise the rate either
            if rate > best.tokens_per_ms * (1 + 1e-9):
                chosen: list[Choice | None] = [None] * len(candidates)
                for j in order[:k]:
                    chosen[j] = choice
                best = Decision(chosen, rate)
    return best


@dataclass
class AutoStats:
    """Time spent deciding (seconds) and decisions made, over the life of a scheduler."""

    decisions: int = 0
    seconds: float = 0.0


class AutoScheduler:
    """The engine's ``auto`` decisions: a cost lookup ``costs`` (``PassCostTable`` measured here, else
    ``DefaultCosts``), the time spent deciding (``stats``), and ``warned``: whether the "costs not measured"
    notice was given. Setting ``costs`` forgets the decisions remembered with the previous ones."""

    def __init__(self, costs: CostLookup | None = None) -> None:
        self.stats, self.warned = AutoStats(), False
        self._memo: dict = {}
        self.costs = costs or DefaultCosts()

    @property
    def costs(self) -> CostLookup:
        return self._costs

    @costs.setter
    def costs(self, costs: CostLookup) -> None:
        self._costs = costs
        self._memo.clear()

    def decide(self, candidates: Sequence[Candidate], batch: int, block_lengths: Sequence[int],
               fixed_tokens: float = 0.0, fixed_ms: float = 0.0, fused_subblocks: int = 0) -> Decision:
        """``decide`` with this scheduler's costs, timed, and remembered: steps that look the same (batch, options,
        acceptances to 0.02, remaining tokens up to the longest block) reuse the decision instead of recomputing
        it, which is most steps of a batch that stays in AR. Raises ``CostTableError`` for a kind the costs lack."""
        start = time.perf_counter()
        longest = max(block_lengths)
        key = (batch, tuple(block_lengths), fused_subblocks, round(fixed_tokens, 1), round(fixed_ms, 3),
               tuple((round(c.acceptance * 50), -1 if c.fused_acceptance is None else round(c.fused_acceptance * 50),
                      c.in_fused, min(c.remaining, longest)) for c in candidates))
        out = self._memo.get(key)
        if out is None:
            out = decide(candidates, batch, self.costs, block_lengths, fixed_tokens, fixed_ms, fused_subblocks)
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo[key] = out
        self.stats.decisions += 1
        self.stats.seconds += time.perf_counter() - start
        return out

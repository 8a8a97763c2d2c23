"""Book-keeping of a ``train_tiny.py`` run: budgets, optimizer, data sampling, evaluation log, save/resume,
and the intra-op thread count (the CPU is shared, so it is chosen by timing)."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

import nld_objective as obj
from trimode.runtime.model.network import LoraAdapter, NLDModel

PHASES = ("ar", "joint", "lora", "done")


@dataclass(frozen=True)
class Budget:
    """A phase's budget in minutes of wall clock or in optimizer steps."""

    total: float
    unit: str  # "minutes" | "steps"

    @property
    def unit_name(self) -> str:
        return "min" if self.unit == "minutes" else "steps"

    def used(self, elapsed_s: float, steps: int) -> float:
        return elapsed_s / 60.0 if self.unit == "minutes" else float(steps)


class ThreadTuner:
    """Chooses between 1 and ``max_threads`` intra-op threads: every ``period_s`` it times ``probe_steps``
    steps with the other count and keeps the faster. On a busy 2-core machine 2 threads can be several
    times slower than 1 (threads wait for each other); on an idle one they are faster."""

    def __init__(self, max_threads: int, period_s: float = 120.0, probe_steps: int = 4) -> None:
        self.choices = sorted({1, max(1, max_threads)})
        self.current = self.choices[-1]
        self.period_s, self.probe_steps = period_s, probe_steps
        self.recent: deque[float] = deque(maxlen=probe_steps)
        self.probe: list[float] | None = None
        self.previous = self.current
        self.last_probe = time.monotonic()
        torch.set_num_threads(self.current)

    def _use(self, threads: int) -> None:
        self.current = threads
        torch.set_num_threads(threads)

    def reset(self) -> None:
        """Forget timings (the step changed kind, e.g. a new phase)."""
        self.recent.clear()
        self.probe = None
        self.last_probe = time.monotonic()

    def record(self, seconds: float) -> None:
        if self.probe is not None:
            self.probe.append(seconds)
            if len(self.probe) > self.probe_steps:  # the first probe step pays for the switch
                if statistics.median(self.probe[1:]) < statistics.median(self.recent):
                    self.recent = deque(self.probe[1:], maxlen=self.probe_steps)
                else:
                    self._use(self.previous)
                self.probe, self.last_probe = None, time.monotonic()
            return
        self.recent.append(seconds)
        due = time.monotonic() - self.last_probe > self.period_s
        if len(self.choices) > 1 and len(self.recent) == self.probe_steps and due:
            self.previous = self.current
            self._use(next(c for c in self.choices if c != self.current))
            self.probe = []


class Run:
    """Mutable state of one training run; ``state`` is what a resume restores (with model and optimizer)."""

    def __init__(self, settings, model: NLDModel, tokenizer, train_ids: torch.Tensor, windows: torch.Tensor,
                 work_dir: Path | None, log) -> None:
        self.settings, self.model, self.tokenizer = settings, model, tokenizer
        self.train_ids, self.windows, self.work_dir, self.log = train_ids, windows, work_dir, log
        s = settings
        self.budgets = {"ar": Budget(s.ar_budget, s.unit), "joint": Budget(s.joint_budget, s.unit),
                        "lora": Budget(s.lora_budget, s.unit)}
        self.gen = torch.Generator().manual_seed(s.seed)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))
        zero = {p: 0 for p in PHASES[:3]}
        self.state: dict = {"phase": "ar", "steps": dict(zero), "tokens": dict(zero), "elapsed": dict(zero),
                            "used": dict(zero), "history": []}
        self.tuner = ThreadTuner(s.max_threads)
        self.train_loss: dict[str, float] = {}
        self.last_eval = self.last_save = time.monotonic()
        self._rollout: torch.Tensor | None = None

    # ---- phases and schedule ------------------------------------------------------------------------

    @staticmethod
    def phase_index(phase: str) -> int:
        return PHASES.index(phase)

    def schedule_progress(self, phase: str) -> float:
        """0 -> 1 over the phase's LR schedule; ``ar`` and ``joint`` share one schedule."""
        used, b = self.state["used"], self.budgets
        if phase == "lora":
            return used["lora"] / b["lora"].total
        return (used["ar"] + used["joint"]) / (b["ar"].total + b["joint"].total)

    def start_lora(self) -> None:
        """Freeze the base model and attach a fresh drafter LoRA (A small random, B zero: starts as a no-op)."""
        s, cfg = self.settings, self.model.config
        for p in self.model.parameters():
            p.requires_grad_(False)
        adapter = LoraAdapter(cfg.num_hidden_layers, cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size,
                              s.lora_rank, s.lora_alpha)
        gen = torch.Generator().manual_seed(s.seed + 1)
        with torch.no_grad():
            for a in adapter.lora_A:
                a.copy_(torch.randn(a.shape, generator=gen) / a.shape[1] ** 0.5)
        self.model.set_lora(adapter)
        self.optimizer = torch.optim.AdamW(adapter.parameters(), lr=s.lora_lr, betas=(0.9, 0.95), weight_decay=0.0)

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.settings.bf16 else contextlib.nullcontext()

    def sample_batch(self) -> torch.Tensor:
        s = self.settings
        starts = torch.randint(0, len(self.train_ids) - s.seq_len, (s.batch_size,), generator=self.gen)
        return self.train_ids[starts[:, None] + torch.arange(s.seq_len)]

    def smooth(self, parts: dict[str, float]) -> None:
        for k, v in parts.items():
            self.train_loss[k] = v if k not in self.train_loss else 0.9 * self.train_loss[k] + 0.1 * v

    # ---- evaluation and logging ---------------------------------------------------------------------

    def eval_due(self, phase: str) -> bool:
        s = self.settings
        if s.unit == "steps":
            return self.state["steps"][phase] % max(1, int(s.eval_every)) == 0
        return time.monotonic() - self.last_eval >= 60 * s.eval_every

    def log_eval(self, phase: str) -> dict:
        st = self.state
        self.model.eval()
        if phase == "lora":  # the base is frozen: only the drafter changes
            metrics = self.draft_acceptance()
        else:
            metrics = obj.evaluate(self.model, self.windows[: self.settings.eval_windows], self.settings.eps)
        self.model.train()
        entry = {"phase": phase, "step": sum(st["steps"].values()), "tokens": sum(st["tokens"].values()),
                 "minutes": round(sum(st["elapsed"].values()) / 60, 2),
                 "train": {k: round(v, 4) for k, v in self.train_loss.items()},
                 "heldout": {k: round(v, 4) for k, v in metrics.items()}}
        st["history"].append(entry)
        self.log(f"[{phase} {entry['minutes']:.1f} min, step {entry['step']}, {entry['tokens'] / 1e6:.2f} M tok] "
                 f"train {entry['train']} | held-out {entry['heldout']}")
        self.last_eval = time.monotonic()
        return metrics

    @torch.no_grad()
    def draft_acceptance(self, num_windows: int = 8) -> dict[str, float]:
        """Mean accepted one-pass draft length per block, without and with the LoRA (base frozen, so the
        greedy rollout targets are computed once)."""
        x0 = self.windows[:num_windows]
        if self._rollout is None:
            self._rollout = obj.greedy_block_rollout(self.model, x0)
        out = {}
        for name, use_lora in (("base", False), ("lora", True)):
            draft = obj.draft_logits(self.model, x0, use_lora).argmax(-1)
            accepted = obj.accepted_lengths(draft, self._rollout, self.model.config.block_size)
            out[f"accepted_{name}"] = float(accepted.float().mean())
        return out

    def summary(self) -> dict:
        st = self.state
        return {"steps": st["steps"], "tokens": st["tokens"],
                "minutes": {k: round(v / 60, 2) for k, v in st["elapsed"].items()},
                "unigram_entropy": st["unigram_entropy"], "history": st["history"]}

    # ---- save / resume ------------------------------------------------------------------------------

    def save_due(self) -> bool:
        return self.work_dir is not None and time.monotonic() - self.last_save >= 60 * self.settings.save_every_minutes

    def save_state(self, phase: str) -> None:
        if self.work_dir is None:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        blob = {"state": {**self.state, "phase": phase}, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "gen": self.gen.get_state(),
                "tokenizer": self.tokenizer.backend.to_str(), "settings": dataclasses.asdict(self.settings)}
        tmp = self.work_dir / "state.pt.tmp"
        torch.save(blob, tmp)
        tmp.replace(self.work_dir / "state.pt")
        self.last_save = time.monotonic()

    def restore(self, saved: dict) -> None:
        if saved["settings"] != dataclasses.asdict(self.settings):
            changed = {k for k, v in saved["settings"].items() if dataclasses.asdict(self.settings).get(k) != v}
            self.log(f"warning: settings differ from the saved run in {sorted(changed)}; using the new ones")
        unigram = self.state.get("unigram_entropy")
        self.state = saved["state"]
        self.state.setdefault("unigram_entropy", unigram)
        if any(k.startswith("lora.") for k in saved["model"]):
            self.start_lora()
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.gen.set_state(saved["gen"])

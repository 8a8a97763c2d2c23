"""Train the embedded tiny tri-mode model (``models/tiny-kjv``) from scratch on CPU.

The network is the runtime's own ``trimode.runtime.model.NLDModel``; the objective is NLD's
(``scripts/nld_objective.py``). Three phases, each with a wall-clock (or step) budget:

1. ``ar``: AR-only warm-up, causal forward over x_0 (cheaper per token; the largest single win on CPU).
2. ``joint``: L_AR + 0.3 L_diff over ``[x_t | x_0]`` with the block-diffusion mask; each block's slot 0 is
   kept clean with probability ``keep_seed_prob`` (it is the AR seed at inference). One LR schedule
   (warm-up + cosine) spans phases 1 and 2.
3. ``lora``: base frozen; the drafter LoRA on o_proj learns the one-pass draft [seed, MASK x 15] with the
   base model's greedy AR rollout of each block as target (what greedy verification accepts).

State (model, optimizer, sampler, counters) is saved to ``--work-dir`` every few minutes; ``--resume``
continues from it. Reproduce the shipped checkpoint with ``python scripts/train_tiny.py`` (defaults).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on a shared 2-core box

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kjv_corpus  # noqa: E402
import nld_objective as obj  # noqa: E402
from tiny_run import Run  # noqa: E402

from trimode.runtime.model.checkpoint import load_model, save_checkpoint  # noqa: E402
from trimode.runtime.model.config import ModelConfig, RopeConfig  # noqa: E402
from trimode.runtime.model.network import NLDModel  # noqa: E402
from trimode.runtime.model.tokenizer import Tokenizer  # noqa: E402

PRESETS = {  # model shapes; "kjv" is the shipped model, "test" the unit-test one
    "kjv": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                num_key_value_heads=2, head_dim=32, block_size=16),
    "test": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=24, block_size=8),
}


@dataclass(frozen=True)
class TrainSettings:
    """Everything that defines a run. Budgets are minutes of wall clock, or optimizer steps if ``unit`` is
    ``"steps"`` (deterministic: tests)."""

    preset: str = "kjv"
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 4
    lr: float = 3e-3
    lora_lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    alpha: float = 0.3
    eps: float = 1e-3
    keep_seed_prob: float = 0.85
    lora_rank: int = 16
    lora_alpha: float = 32.0
    rollout_iters: int = 2
    unit: str = "minutes"
    ar_budget: float = 12.0
    joint_budget: float = 65.0
    lora_budget: float = 8.0
    eval_every: float = 2.0
    save_every_minutes: float = 3.0
    eval_windows: int = 24
    seed: int = 0
    max_threads: int = 2
    bf16: bool = False


def model_config(s: TrainSettings, vocab_size: int, mask_id: int, eos_id: int) -> ModelConfig:
    rope = RopeConfig(rope_type="yarn", rope_theta=10000.0, factor=2.0,
                      original_max_position_embeddings=s.seq_len, llama_4_scaling_beta=0.1)
    return ModelConfig(vocab_size=vocab_size, mask_token_id=mask_id, eos_token_id=eos_id, bos_token_id=None,
                       max_position_embeddings=2 * s.seq_len, rope=rope, torch_dtype="bfloat16",
                       **PRESETS[s.preset])


def init_weights(model: NLDModel, seed: int) -> None:
    """Normal(0, 0.02) matrices, residual-output projections scaled by 1/sqrt(2 layers), unit norms."""
    gen = torch.Generator().manual_seed(seed)
    depth_scale = (2 * model.config.num_hidden_layers) ** -0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                std = 0.02 * (depth_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def make_tokenizer(train_text: str, vocab_size: int) -> Tokenizer:
    hf = kjv_corpus.train_tokenizer(train_text, vocab_size)
    return Tokenizer(hf, eos_token=kjv_corpus.EOT_TOKEN, mask_token=kjv_corpus.MASK_TOKEN)


def heldout_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping held-out windows [N, seq_len]."""
    num = len(ids) // seq_len
    if num == 0:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return ids[: num * seq_len].view(num, seq_len)


def base_step(run: Run, phase: str, x0: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    s = run.settings
    if phase == "ar":
        loss = obj.ar_loss(run.model, x0)
        return loss, {"ar": loss.item()}
    noised = obj.add_noise(x0, run.model.config.mask_token_id, run.model.config.block_size, run.gen, s.eps,
                           s.keep_seed_prob)
    loss, l_ar, l_diff = obj.joint_loss(run.model, x0, *noised, alpha=s.alpha)
    return loss, {"ar": l_ar.item(), "diff": l_diff.item()}


def lora_step(run: Run, x0: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """CE of the one-pass LoRA draft against the base model's greedy rollout of each block.

    ``rollout_iters`` Jacobi iterations make slots 1..rollout_iters+1 exact; only those slots are trained
    (greedy acceptance is a leading run, so the first slots carry almost all of it, and the later slots'
    approximate targets would teach the drafter wrong tokens)."""
    exact_slots = run.settings.rollout_iters + 1
    target = obj.greedy_block_rollout(run.model, x0, run.settings.rollout_iters)
    logits = obj.draft_logits(run.model, x0, use_lora=True)
    slot = torch.arange(x0.shape[1]) % run.model.config.block_size
    is_trained = (slot >= 1) & (slot <= exact_slots)
    loss = torch.nn.functional.cross_entropy(logits[:, is_trained].flatten(0, 1).float(),
                                             target[:, is_trained].flatten())
    return loss, {"draft": loss.item()}


def run_phase(run: Run, phase: str) -> None:
    """Train ``phase`` until its budget is used (resumes mid-phase); evaluates and saves on schedule."""
    s, st = run.settings, run.state
    budget = run.budgets[phase]
    params = [p for p in run.model.parameters() if p.requires_grad]
    run.tuner.reset()
    run.train_loss = {}
    bar = tqdm(total=budget.total, initial=min(st["used"][phase], budget.total), desc=phase, unit=budget.unit_name,
               mininterval=1 if sys.stderr.isatty() else 30,
               bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} {unit} {postfix}")
    last = time.monotonic()
    while st["used"][phase] < budget.total:
        progress = run.schedule_progress(phase)
        peak, warm = (s.lora_lr, 10) if phase == "lora" else (s.lr, s.warmup_steps)
        step = st["steps"][phase] + (st["steps"]["ar"] if phase == "joint" else 0)
        for group in run.optimizer.param_groups:
            group["lr"] = obj.cosine_lr(peak, progress, step, warm)
        x0 = run.sample_batch()
        started = time.monotonic()
        with run.autocast():
            loss, parts = lora_step(run, x0) if phase == "lora" else base_step(run, phase, x0)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        run.optimizer.step()
        run.tuner.record(time.monotonic() - started)
        st["steps"][phase] += 1
        st["tokens"][phase] += x0.numel()
        run.smooth(parts)
        now = time.monotonic()
        st["elapsed"][phase] += now - last
        last = now
        done = budget.used(st["elapsed"][phase], st["steps"][phase])
        bar.update(min(done, budget.total) - st["used"][phase])
        st["used"][phase] = done
        losses = " ".join(f"{k}={v:.3f}" for k, v in run.train_loss.items())
        bar.set_postfix_str(f"{losses} thr={run.tuner.current}", refresh=False)
        if run.eval_due(phase) or st["used"][phase] >= budget.total:
            run.log_eval(phase)
            last = time.monotonic()
        if run.save_due() or st["used"][phase] >= budget.total:
            run.save_state(phase)
    bar.close()


def train(train_text: str, heldout_text: str, settings: TrainSettings, out_dir: Path, work_dir: Path | None = None,
          resume: bool = False, log=print) -> dict:
    """Run all phases on the given texts and write the checkpoint to ``out_dir``; returns the final metrics."""
    s = settings
    torch.manual_seed(s.seed)
    state_file = work_dir / "state.pt" if work_dir else None
    saved = torch.load(state_file, weights_only=False) if resume and state_file and state_file.exists() else None
    if saved is not None:
        tokenizer = Tokenizer(kjv_corpus.HFTokenizer.from_str(saved["tokenizer"]), kjv_corpus.EOT_TOKEN,
                              kjv_corpus.MASK_TOKEN)
        log(f"resuming from {state_file} (phase {saved['state']['phase']})")
    else:
        tokenizer = make_tokenizer(train_text, s.vocab_size)
    mask_id = tokenizer.token_to_id(kjv_corpus.MASK_TOKEN)
    eos_id = tokenizer.token_to_id(kjv_corpus.EOT_TOKEN)
    cfg = model_config(s, tokenizer.vocab_size, mask_id, eos_id)
    model = NLDModel(cfg)
    init_weights(model, s.seed)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    windows = heldout_windows(torch.tensor(tokenizer.encode(heldout_text), dtype=torch.long), s.seq_len)
    run = Run(s, model, tokenizer, train_ids, windows, work_dir, log)
    run.state["unigram_entropy"] = obj.unigram_entropy(train_ids, cfg.vocab_size)
    log(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, train {len(train_ids)} tokens, "
        f"held-out {windows.numel()} tokens ({len(windows)} windows), unigram entropy "
        f"{run.state['unigram_entropy']:.3f} nats")
    if saved is not None:
        run.restore(saved)
    else:
        run.log_eval("init")
    for phase in ("ar", "joint", "lora"):
        if run.phase_index(phase) < run.phase_index(run.state["phase"]):
            continue
        if phase == "lora" and model.lora is None:
            run.start_lora()
        run.state["phase"] = phase
        run_phase(run, phase)
    run.state["phase"] = "done"
    save_checkpoint(model, out_dir, dtype="bfloat16", tokenizer=tokenizer)
    metrics = final_metrics(out_dir, windows, s)
    summary = {"settings": dataclasses.asdict(s), **run.summary(), "final": metrics}
    (out_dir / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    log("final (shipped checkpoint, all held-out windows): " + json.dumps(metrics))
    return summary


def final_metrics(out_dir: Path, windows: torch.Tensor, s: TrainSettings, accept_windows: int = 16) -> dict:
    """Held-out metrics of the checkpoint as written (bf16 weights), plus one-pass draft acceptance."""
    model = load_model(out_dir)
    metrics = obj.evaluate(model, windows, s.eps)
    with torch.no_grad():
        x0 = windows[:accept_windows]
        target = obj.greedy_block_rollout(model, x0)
        for name, use_lora in (("base", False), ("lora", True)):
            draft = obj.draft_logits(model, x0, use_lora).argmax(-1)
            accepted = obj.accepted_lengths(draft, target, model.config.block_size).float()
            metrics[f"accepted_{name}"] = float(accepted.mean())
            metrics[f"full_block_{name}"] = float((accepted == model.config.block_size - 1).float().mean())
    return {k: round(v, 4) for k, v in metrics.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TrainSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=kjv_corpus.DEFAULT_CORPUS,
                   help="raw `bible gen1:1-rev22:21` output; fetched with apt/bible-kjv if missing")
    p.add_argument("--out", type=Path, default=kjv_corpus.REPO_ROOT / "models" / "tiny-kjv")
    p.add_argument("--work-dir", type=Path, default=kjv_corpus.REPO_ROOT / "data" / "tiny-kjv-run")
    p.add_argument("--resume", action="store_true", help="continue from --work-dir/state.pt")
    for phase in ("ar", "joint", "lora"):
        p.add_argument(f"--{phase}-minutes", type=float, default=getattr(d, f"{phase}_budget"))
        p.add_argument(f"--{phase}-steps", type=int, default=None, help="budget in steps instead (all or none)")
    for name in ("seq_len", "batch_size", "lr", "seed", "max_threads", "eval_windows", "lora_rank"):
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(d, name)), default=getattr(d, name))
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (only fast on CPUs with AVX512_BF16/AMX)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    steps = [a.ar_steps, a.joint_steps, a.lora_steps]
    if any(x is not None for x in steps) and None in steps:
        raise SystemExit("give all of --ar-steps, --joint-steps, --lora-steps, or none")
    budgets = steps if steps[0] is not None else [a.ar_minutes, a.joint_minutes, a.lora_minutes]
    unit = "steps" if steps[0] is not None else "minutes"
    s = TrainSettings(seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr, seed=a.seed, max_threads=a.max_threads,
                      eval_windows=a.eval_windows, lora_rank=a.lora_rank, lora_alpha=2.0 * a.lora_rank, unit=unit,
                      ar_budget=budgets[0], joint_budget=budgets[1], lora_budget=budgets[2], bf16=a.bf16,
                      eval_every=TrainSettings.eval_every if unit == "minutes" else max(1, sum(budgets) // 10))
    train_text, heldout_text = kjv_corpus.split_chapters(kjv_corpus.ensure_corpus(a.corpus))
    started = time.time()
    train(train_text, heldout_text, s, a.out, a.work_dir, a.resume, log=lambda m: print(m, flush=True))
    print(f"done in {(time.time() - started) / 60:.1f} min; checkpoint in {a.out}", flush=True)


if __name__ == "__main__":
    main()

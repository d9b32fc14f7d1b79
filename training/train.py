"""The training loop: truncated BPTT with carried state, AdamW, clipping, validation, checkpoints.

Reads top to bottom: setup (training/setup.py: data, model, optimizer), start or resume
(training/resume.py), the loop, then logging, validation and the checkpoint. What a run holds
fixed is a `Setup`; what changes from step to step (the counters, the carried state, the best
loss, the clocks) is one `RunState`, which a checkpoint saves and `--resume` restores. Under
torchrun the same loop runs in every process with DistributedDataParallel (training/distributed.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from training import distributed
from training.batching import epoch_offset
from training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_atomic
from training.config import TrainConfig
from training.evaluate import evaluate
from training.model import State
from training.plot import plot_losses
from training.resume import RunState, read_metrics, resume, rng_state, start
from training.schedule import learning_rate
from training.setup import Setup, build_setup, plan

__all__ = ["TrainConfig", "TrainResult", "train"]


@dataclass
class TrainResult:
    step: int
    best_val_loss: float
    last_val_loss: float
    out: Path
    chars_per_s: float
    seconds: float


def train(cfg: TrainConfig) -> TrainResult:
    cfg.validate()
    ranks = distributed.setup(cfg.device, cfg.batch_size)
    finished = False
    try:
        result = _train(cfg, ranks)
        finished = True
        return result
    finally:
        distributed.teardown(ranks, finished)


def _train(cfg: TrainConfig, ranks: distributed.Ranks) -> TrainResult:
    setup = build_setup(cfg, ranks)
    run = resume(setup) if cfg.resume else start(setup)
    return _loop(setup, run)


def _loop(setup: Setup, run: RunState) -> TrainResult:
    """Windows of carried-state lanes, epoch after epoch, until the step count or the time budget is reached."""
    net: torch.nn.Module = setup.model
    if setup.ranks.distributed:
        device_ids = [setup.device.index] if setup.device.type == "cuda" else None
        net = DistributedDataParallel(setup.model, device_ids=device_ids)

    from tqdm import tqdm

    setup.say(plan(setup))
    bar = tqdm(
        total=setup.max_steps,
        initial=run.step,
        disable=not (setup.cfg.progress and setup.ranks.is_main),
        unit="step",
        dynamic_ncols=True,
    )
    run.start_clocks()
    net.train()
    finished = False
    while not finished:
        offset = epoch_offset(setup.cfg.seed, run.epoch, setup.cfg.seq_len)
        if run.window == 0:
            run.carried = setup.fresh_state()
        for x, y in setup.batcher.epoch(offset, start=run.window, rows=setup.lanes):
            lr = _train_step(setup, net, run, x, y)
            spent = run.training_seconds()
            # Every process stops at the same step: the first to run out of time decides. The time
            # includes the final validation and its checkpoint, so a step starts only if they fit.
            out_of_time = setup.ranks.any(
                setup.budget_s is not None and spent + _final_validation_s(setup, run) >= setup.budget_s, setup.device
            )
            finished = out_of_time or (setup.max_steps is not None and run.step >= setup.max_steps)
            validate = finished or run.step % setup.cfg.eval_interval == 0
            if validate or run.step % 10 == 0:
                _log(setup, run, bar, lr, spent, validate, final=finished)
            if finished:
                break
        else:
            run.epoch += 1
            run.window = 0
    bar.close()
    seconds = time.perf_counter() - run.t_start
    setup.say(_time_spent(setup, run, seconds))
    return TrainResult(
        step=run.step,
        best_val_loss=run.best_val if math.isfinite(run.best_val) else float("nan"),
        last_val_loss=run.last_val,
        out=setup.out,
        chars_per_s=run.steps_this_run * setup.chars_per_step / max(seconds, 1e-9),
        seconds=seconds,
    )


def _train_step(setup: Setup, net: torch.nn.Module, run: RunState, x: Tensor, y: Tensor) -> float:
    """One optimizer step on one window of every lane; returns the learning rate it used."""
    cfg = setup.cfg
    progress = run.training_seconds() / setup.budget_s if cfg.time_only and setup.budget_s else None
    lr = learning_rate(
        run.step, cfg.peak_lr, cfg.warmup_steps, setup.decay_steps, cfg.schedule, cfg.min_lr_ratio, progress=progress
    )
    for group in setup.optimizer.param_groups:
        group["lr"] = lr
    x, y = x.to(setup.device, non_blocking=True), y.to(setup.device, non_blocking=True)
    with setup.precision.autocast():
        logits, carried = net(x, run.carried)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    # Truncated BPTT: keep the values, cut the graph at the window boundary. The carried state
    # stays fp32 (autocast returns it in bf16/fp16), as the checkpoint and the export expect.
    run.carried = tuple(t.detach().float() for t in carried)
    setup.optimizer.zero_grad(set_to_none=True)
    setup.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
    setup.scaler.unscale_(setup.optimizer)  # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(setup.model.parameters(), cfg.grad_clip)
    setup.scaler.step(setup.optimizer)
    setup.scaler.update()
    run.step += 1
    run.window += 1
    run.steps_this_run += 1
    run.steps_since_log += 1
    run.loss_since_log += loss.item()
    return lr


def _log(setup: Setup, run: RunState, bar: Any, lr: float, spent: float, validate: bool, final: bool) -> None:
    """A metrics row for the steps since the last one; with `validate`, the validation loss and a checkpoint."""
    now = time.perf_counter()
    cps = run.steps_since_log * setup.chars_per_step / max(now - run.t_log, 1e-9)
    row: dict[str, Any] = {
        "step": run.step,
        "epoch": run.epoch,
        "train_loss": round(setup.ranks.mean(run.loss_since_log / run.steps_since_log, setup.device), 5),
        "lr": lr,
        "chars_per_s": round(cps, 1),
        "elapsed_s": round(spent, 2),
    }
    bar.set_postfix(loss=f"{row['train_loss']:.3f}", chars_s=f"{cps:,.0f}")
    bar.update(run.steps_since_log)
    run.t_log, run.steps_since_log, run.loss_since_log = now, 0, 0.0
    if not run.estimated and setup.budget_s is not None and run.steps_this_run >= 20:
        run.estimated = True
        left = max(0.0, setup.budget_s - spent)
        steps_left = int(left * run.steps_this_run / max(now - run.t_start, 1e-9))
        setup.say(
            f"  at {cps:,.0f} chars/s the time budget allows about {steps_left:,} more steps "
            f"(~{(run.step + steps_left) / setup.batcher.batches_per_epoch:.1f} epochs in all)"
        )
    if validate:
        _validate(setup, run, row, spent, final)
        if setup.ranks.is_main:
            bar.write(
                f"step {run.step}: train {row['train_loss']:.4f}  val {run.last_val:.4f}"
                f"  best {run.best_val:.4f}  {cps:,.0f} chars/s"
            )
    if setup.ranks.is_main:
        with setup.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if "val_loss" in row:
            plot_losses(read_metrics(setup.metrics_path, run.step), setup.out / "loss.png")


def _validate(setup: Setup, run: RunState, row: dict[str, Any], spent: float, final: bool) -> None:
    """Process 0 measures the validation loss and writes last.pt (and best.pt when it improved).

    A periodic validation reads the fixed sample of --eval-chars characters; the final one reads
    the whole split. The sample estimates the same loss, so both compete for best.pt.
    """
    every_lane = setup.ranks.gather_lanes(run.carried)
    rngs = setup.ranks.gather_objects(rng_state())
    if setup.ranks.is_main:
        started = time.perf_counter()
        # Under a time budget the final validation reads the sample too: the whole split may not fit.
        whole = final and setup.budget_s is None
        bound = None if whole else setup.cfg.eval_chars or None
        run.last_val, chars = evaluate(setup.model, setup.val_ids, max_chars=bound, progress=setup.cfg.progress)
        validated = time.perf_counter()
        row["val_loss"] = round(run.last_val, 5)
        row["val_chars"] = chars
        improved = run.last_val < run.best_val
        run.best_val = min(run.best_val, run.last_val)
        ckpt = _checkpoint(setup, run, every_lane, rngs, spent)
        save_atomic(ckpt, setup.last_path)
        if improved:
            save_atomic(ckpt, setup.best_path)
        written = time.perf_counter()
        run.val_seconds += validated - started
        run.checkpoint_seconds += written - validated
        run.val_runs += 1
        run.last_validation_s = written - started
    run.last_val = setup.ranks.from_main(run.last_val, setup.device)
    run.best_val = setup.ranks.from_main(run.best_val, setup.device)


def _final_validation_s(setup: Setup, run: RunState) -> float:
    """What the final validation and its checkpoint will take: as long as the last one did, or before
    any, the sample's characters at three times the training speed (a forward pass alone)."""
    if run.val_runs:
        return run.last_validation_s
    trained = run.steps_this_run * setup.chars_per_step
    if not trained:
        return 0.0
    sample = min(setup.cfg.eval_chars or len(setup.val_ids), len(setup.val_ids))
    return sample * (time.perf_counter() - run.t_start) / trained / 3


def _time_spent(setup: Setup, run: RunState, seconds: float) -> str:
    """The closing line: how this run's time went."""
    stepping = seconds - run.val_seconds - run.checkpoint_seconds
    budget = "" if setup.budget_s is None else f" of the {setup.budget_s:,.0f} s budget"
    return (
        f"time: {seconds:,.1f} s{budget}: {run.steps_this_run:,} steps {stepping:,.1f} s, "
        f"{run.val_runs} validations {run.val_seconds:,.1f} s, checkpoints {run.checkpoint_seconds:,.1f} s"
    )


def _checkpoint(setup: Setup, run: RunState, every_lane: State, rngs: list[Any], seconds: float) -> dict[str, Any]:
    """One self-describing dict: enough to resume this run exactly, or to sample and export."""
    cfg = setup.cfg
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model_config": setup.model.config.to_dict(),
        "model_state": setup.model.state_dict(),
        "optimizer_state": setup.optimizer.state_dict(),
        "scaler_state": setup.scaler.state_dict(),  # empty unless fp16
        "precision": setup.precision.name,
        "vocab": setup.vocab.to_json(),
        "step": run.step,
        "epoch": run.epoch,
        "window": run.window,
        "val_loss": run.last_val,
        "best_val_loss": run.best_val,
        "carried_state": [t.detach().cpu() for t in every_lane],  # every lane, in lane order
        "rng": rngs[0],
        "rng_ranks": rngs,
        "train_seconds": seconds,
        "world_size": setup.ranks.world_size,
        "init_from": None if setup.prior is None else setup.prior.record(list(setup.new_chars)),
        "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("resume", "progress")},
        "corpus": {
            "name": setup.corpus.name,
            "chars": len(setup.corpus.text),
            "sha256": setup.corpus.sha256,
            "val_fraction": cfg.val_fraction,
        },
    }

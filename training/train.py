"""The training loop: truncated BPTT with carried state, AdamW, clipping, validation, checkpoints.

Reads top to bottom: config, data, model, optimizer, resume, loop, checkpoint. Under torchrun
the same loop runs in every process with DistributedDataParallel (training/distributed.py).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from training import distributed
from training.batching import LaneBatcher, epoch_offset
from training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_checkpoint,
    remove_stray_temp_files,
    save_atomic,
)
from training.config import TrainConfig
from training.corpus import Vocabulary, read_corpus
from training.errors import InvalidSetting, UserError
from training.evaluate import evaluate_loss
from training.model import CharRNN, ModelConfig
from training.plot import plot_losses
from training.schedule import learning_rate

__all__ = ["TrainConfig", "TrainResult", "train"]


@dataclass
class TrainResult:
    step: int
    best_val_loss: float
    last_val_loss: float
    out: Path
    chars_per_s: float
    seconds: float


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _read_metrics(path: Path, upto_step: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto_step]


def _plan(
    cfg: TrainConfig, model: CharRNN, corpus_name: str, train_chars: int, batcher: LaneBatcher, max_steps: int | None
) -> str:
    """How long and how far the run will go, said before the first step."""
    mc = model.config
    per_epoch = batcher.batches_per_epoch
    head = (
        f"training {mc.cell} {mc.num_layers}x{mc.hidden_size} ({model.num_parameters() / 1e6:.2f}M parameters) "
        f"on {corpus_name}: {train_chars:,} training chars, {per_epoch:,} steps of "
        f"{cfg.batch_size} x {cfg.seq_len} chars per epoch"
    )
    budget = f"{cfg.max_minutes:g} min" if cfg.max_minutes is not None else None
    if max_steps is None:
        until = f"for {budget} (the learning rate decays over the time; steps as fast as this machine goes)"
    else:
        until = f"to step {max_steps:,} ({max_steps / per_epoch:.1f} epochs)"
        if budget:
            until += f" or for {budget}, whichever comes first"
    return f"{head}\n  runs {until}; validates every {cfg.eval_interval} steps and at the end"


def train(cfg: TrainConfig) -> TrainResult:
    cfg.validate()
    ranks = distributed.setup(cfg.device, cfg.batch_size)
    try:
        return _train(cfg, ranks)
    finally:
        distributed.teardown(ranks)


def _train(cfg: TrainConfig, ranks: distributed.Ranks) -> TrainResult:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InvalidSetting(f"out {out} exists and is not a folder", ("out",))
    device = ranks.device(cfg.device)

    def say(text: str) -> None:
        if ranks.is_main:
            print(text, flush=True)

    # Data: the vocabulary covers train and validation text, so validation has no unknowns.
    corpus = read_corpus(cfg.data)
    vocab = Vocabulary.from_text(corpus.text)
    train_text, val_text = corpus.split(cfg.val_fraction)
    train_ids = torch.tensor(vocab.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(vocab.encode(val_text), dtype=torch.long)
    batcher = LaneBatcher(train_ids, cfg.batch_size, cfg.seq_len)
    my_lanes = ranks.lanes(cfg.batch_size)
    lanes_here = my_lanes.stop - my_lanes.start
    max_steps: int | None
    if cfg.time_only:
        max_steps = None  # the clock ends the run
    else:
        max_steps = cfg.max_steps or max(1, round((cfg.epochs or 1.0) * batcher.batches_per_epoch))
    decay_steps = cfg.lr_decay_steps or max_steps or 1

    # Model and optimizer: decay matrices only, not biases (nanoGPT's grouping). Every process
    # builds the same initial weights from the same seed; DDP checks and broadcasts them anyway.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model_config = cfg.model_config(len(vocab))
    model = CharRNN(model_config).to(device)
    if cfg.forget_bias is not None:
        model.set_forget_bias(cfg.forget_bias)
    if ranks.distributed:
        # Each process draws its own dropout masks, as it reads its own lanes.
        torch.manual_seed(cfg.seed + ranks.rank)
        random.seed(cfg.seed + ranks.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.99),
    )

    step, epoch, window = 0, 0, 0
    best_val = float("inf")
    last_val = float("nan")
    seconds_before = 0.0  # training time of earlier runs of the same training (resumes)
    state = model.init_state(lanes_here, device)
    last_path, best_path = out / "last.pt", out / "best.pt"
    metrics_path = out / "metrics.jsonl"
    if cfg.resume:
        if not last_path.exists():
            raise UserError(f"resume asked for, but {last_path} does not exist")
        ckpt = load_checkpoint(last_path, map_location=device)
        if ckpt["vocab"] != vocab.to_json():
            raise UserError(f"cannot resume: {last_path} was trained on a different vocabulary")
        if ModelConfig.from_dict(ckpt["model_config"]) != model_config:
            raise UserError(
                f"cannot resume: {last_path} has model {ckpt['model_config']}, "
                f"the settings ask for {model_config.to_dict()}"
            )
        carried = ckpt["carried_state"]
        if carried and carried[0].shape[1] != cfg.batch_size:
            raise InvalidSetting(
                f"cannot resume: {last_path} was trained with batch_size {carried[0].shape[1]}, not {cfg.batch_size}",
                ("batch_size",),
            )
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        step, epoch, window = ckpt["step"], ckpt["epoch"], ckpt["window"]
        best_val, last_val = ckpt["best_val_loss"], ckpt["val_loss"]
        seconds_before = float(ckpt.get("train_seconds", 0.0))
        state = tuple(s[:, my_lanes].to(device) for s in carried)
        rng_ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
        if len(rng_ranks) == ranks.world_size:
            _set_rng_state(rng_ranks[ranks.rank])
        if ranks.is_main:
            for stray in remove_stray_temp_files(last_path, best_path):
                say(f"removed {stray.name}, left by a run stopped while it wrote a checkpoint")
            metrics = _read_metrics(metrics_path, step)
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in metrics))
    elif ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
    if max_steps is not None and step >= max_steps:
        raise InvalidSetting(f"checkpoint is already at step {step}; raise max_steps to train further", ("max_steps",))
    budget_s = None if cfg.max_minutes is None else cfg.max_minutes * 60
    if budget_s is not None and seconds_before >= budget_s:
        raise InvalidSetting(
            f"checkpoint has already trained {seconds_before / 60:.1f} min; raise max_minutes to train further",
            ("max_minutes",),
        )

    net: torch.nn.Module = model
    if ranks.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(
        val_loss: float, carried: tuple[torch.Tensor, ...], rngs: list[Any], seconds: float
    ) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "model_config": model_config.to_dict(),
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "vocab": vocab.to_json(),
            "step": step,
            "epoch": epoch,
            "window": window,
            "val_loss": val_loss,
            "best_val_loss": best_val,
            "carried_state": [s.detach().cpu() for s in carried],  # every lane, in lane order
            "rng": rngs[0],
            "rng_ranks": rngs,
            "train_seconds": seconds,
            "world_size": ranks.world_size,
            "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("resume", "progress")},
            "corpus": {
                "name": corpus.name,
                "chars": len(corpus.text),
                "sha256": corpus.sha256,
                "val_fraction": cfg.val_fraction,
            },
        }

    from tqdm import tqdm

    say(_plan(cfg, model, corpus.name, train_ids.numel(), batcher, max_steps))
    bar = tqdm(
        total=max_steps,
        initial=step,
        disable=not (cfg.progress and ranks.is_main),
        unit="step",
        dynamic_ncols=True,
    )
    chars_per_step = cfg.batch_size * cfg.seq_len
    t_start = time.perf_counter()
    steps_this_run = 0
    estimated = False
    t_log, steps_since_log, loss_since_log = time.perf_counter(), 0, 0.0
    net.train()
    finished = False

    def log_row(row: dict[str, Any]) -> None:
        if ranks.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if "val_loss" in row:
                plot_losses(_read_metrics(metrics_path, step), out / "loss.png")

    while not finished:
        offset = epoch_offset(cfg.seed, epoch, cfg.seq_len)
        if window == 0:
            state = model.init_state(lanes_here, device)
        for x, y in batcher.epoch(offset, start=window, rows=my_lanes):
            spent = seconds_before + time.perf_counter() - t_start
            progress = spent / budget_s if cfg.time_only and budget_s else None
            lr = learning_rate(
                step, cfg.lr, cfg.warmup_steps, decay_steps, cfg.schedule, cfg.min_lr_ratio, progress=progress
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits, state = net(x, state)
            # Truncated BPTT: keep the values, cut the graph at the window boundary.
            state = tuple(s.detach() for s in state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            window += 1
            steps_this_run += 1
            steps_since_log += 1
            loss_since_log += loss.item()
            spent = seconds_before + time.perf_counter() - t_start
            # Every process stops at the same step: the first to run out of time decides.
            out_of_time = ranks.any(budget_s is not None and spent >= budget_s, device)
            finished = out_of_time or (max_steps is not None and step >= max_steps)

            if step % 10 == 0 or finished or step % cfg.eval_interval == 0:
                now = time.perf_counter()
                cps = steps_since_log * chars_per_step / max(now - t_log, 1e-9)
                row: dict[str, Any] = {
                    "step": step,
                    "epoch": epoch,
                    "train_loss": round(ranks.mean(loss_since_log / steps_since_log, device), 5),
                    "lr": lr,
                    "chars_per_s": round(cps, 1),
                    "elapsed_s": round(spent, 2),
                }
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", chars_s=f"{cps:,.0f}")
                bar.update(steps_since_log)
                t_log, steps_since_log, loss_since_log = now, 0, 0.0
                if not estimated and budget_s is not None and steps_this_run >= 20:
                    estimated = True
                    left = max(0.0, budget_s - spent)
                    steps_left = int(left * steps_this_run / max(now - t_start, 1e-9))
                    say(
                        f"  at {cps:,.0f} chars/s the time budget allows about {steps_left:,} more steps "
                        f"(~{(step + steps_left) / batcher.batches_per_epoch:.1f} epochs in all)"
                    )
                if step % cfg.eval_interval == 0 or finished:
                    carried = ranks.gather_lanes(state)
                    rngs = ranks.gather_objects(_rng_state())
                    if ranks.is_main:
                        last_val = evaluate_loss(model, val_ids)
                        row["val_loss"] = round(last_val, 5)
                        improved = last_val < best_val
                        best_val = min(best_val, last_val)
                        ckpt = checkpoint(last_val, carried, rngs, spent)
                        save_atomic(ckpt, last_path)
                        if improved:
                            save_atomic(ckpt, best_path)
                        bar.write(
                            f"step {step}: train {row['train_loss']:.4f}  val {last_val:.4f}"
                            f"  best {best_val:.4f}  {cps:,.0f} chars/s"
                        )
                    last_val = ranks.from_main(last_val, device)
                    best_val = ranks.from_main(best_val, device)
                log_row(row)
            if finished:
                break
        else:
            epoch += 1
            window = 0
    bar.close()
    seconds = time.perf_counter() - t_start
    return TrainResult(
        step=step,
        best_val_loss=best_val if math.isfinite(best_val) else float("nan"),
        last_val_loss=last_val,
        out=out,
        chars_per_s=steps_this_run * chars_per_step / max(seconds, 1e-9),
        seconds=seconds,
    )

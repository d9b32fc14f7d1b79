"""The training loop: truncated BPTT with carried state, AdamW, clipping, validation, checkpoints.

Reads top to bottom: config, data, model, optimizer, resume, loop, checkpoint.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from training.batching import LaneBatcher, epoch_offset
from training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_checkpoint,
    save_atomic,
)
from training.corpus import Vocabulary, read_corpus
from training.errors import UserError
from training.evaluate import evaluate_loss
from training.model import CharRNN, ModelConfig
from training.schedule import SCHEDULES, learning_rate


@dataclass
class TrainConfig:
    data: list[str]
    out: str = "runs/default"
    cell: str = "lstm"
    layers: int = 2
    hidden: int = 256
    embedding: int = 64
    dropout: float = 0.0
    seq_len: int = 128
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    lr_decay_steps: int | None = None  # defaults to max_steps, as nanoGPT's lr_decay_iters
    max_steps: int | None = None
    epochs: float | None = None
    max_minutes: float | None = None  # wall-clock budget: stop, validate and checkpoint when spent
    grad_clip: float = 1.0
    val_fraction: float = 0.1
    eval_interval: int = 250
    seed: int = 1337
    device: str = "auto"
    resume: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be at least 0, got {self.weight_decay}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be at least 0, got {self.warmup_steps}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.grad_clip > 0, f"--grad-clip must be positive, got {self.grad_clip}"),
            (
                self.eval_interval >= 1,
                f"--eval-interval must be at least 1, got {self.eval_interval}",
            ),
            (
                self.max_steps is None or self.max_steps >= 1,
                f"--max-steps must be at least 1, got {self.max_steps}",
            ),
            (
                self.epochs is None or self.epochs > 0,
                f"--epochs must be positive, got {self.epochs}",
            ),
            (
                self.max_minutes is None or self.max_minutes > 0,
                f"--max-minutes must be positive, got {self.max_minutes}",
            ),
            (
                not (self.max_steps is not None and self.epochs is not None),
                "give --max-steps or --epochs, not both",
            ),
            (
                self.device in ("auto", "cpu", "cuda"),
                f"--device must be auto, cpu or cuda, got {self.device!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size,
            cell=self.cell,
            num_layers=self.layers,
            hidden_size=self.hidden,
            embedding_size=self.embedding,
            dropout=self.dropout,
        )


@dataclass
class TrainResult:
    step: int
    best_val_loss: float
    last_val_loss: float
    out: Path
    chars_per_s: float
    seconds: float


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


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


def plot_losses(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", alpha=0.6)
    if val:
        ax.plot(*zip(*val, strict=True), label="validation", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def train(cfg: TrainConfig) -> TrainResult:
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    device = pick_device(cfg.device)

    # Data: the vocabulary covers train and validation text, so validation has no unknowns.
    corpus = read_corpus(cfg.data)
    vocab = Vocabulary.from_text(corpus.text)
    train_text, val_text = corpus.split(cfg.val_fraction)
    train_ids = torch.tensor(vocab.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(vocab.encode(val_text), dtype=torch.long)
    batcher = LaneBatcher(train_ids, cfg.batch_size, cfg.seq_len)
    max_steps = cfg.max_steps or max(1, round((cfg.epochs or 1.0) * batcher.batches_per_epoch))
    decay_steps = cfg.lr_decay_steps or max_steps

    # Model and optimizer: decay matrices only, not biases (nanoGPT's grouping).
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model_config = cfg.model_config(len(vocab))
    model = CharRNN(model_config).to(device)
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
    state = model.init_state(cfg.batch_size, device)
    last_path, best_path = out / "last.pt", out / "best.pt"
    metrics_path = out / "metrics.jsonl"
    if cfg.resume:
        if not last_path.exists():
            raise UserError(f"--resume given, but {last_path} does not exist")
        ckpt = load_checkpoint(last_path, map_location=device)
        if ckpt["vocab"] != vocab.to_json():
            raise UserError(f"cannot resume: {last_path} was trained on a different vocabulary")
        if ckpt["model_config"] != model_config.to_dict():
            raise UserError(
                f"cannot resume: {last_path} has model {ckpt['model_config']}, "
                f"the command line asks for {model_config.to_dict()}"
            )
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        step, epoch, window = ckpt["step"], ckpt["epoch"], ckpt["window"]
        best_val, last_val = ckpt["best_val_loss"], ckpt["val_loss"]
        state = tuple(s.to(device) for s in ckpt["carried_state"])
        _set_rng_state(ckpt["rng"])
        metrics = _read_metrics(metrics_path, step)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in metrics))
    else:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
    if step >= max_steps:
        raise UserError(f"checkpoint is already at step {step}; raise --max-steps to train further")

    def checkpoint(val_loss: float) -> dict[str, Any]:
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
            "carried_state": [s.detach().cpu() for s in state],
            "rng": _rng_state(),
            "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("resume", "progress")},
            "corpus": {
                "name": corpus.name,
                "chars": len(corpus.text),
                "sha256": corpus.sha256,
                "val_fraction": cfg.val_fraction,
            },
        }

    from tqdm import tqdm

    bar = tqdm(total=max_steps, initial=step, disable=not cfg.progress, unit="step", dynamic_ncols=True)
    chars_per_step = cfg.batch_size * cfg.seq_len
    t_start = time.perf_counter()
    steps_this_run = 0
    t_log, steps_since_log, loss_since_log = time.perf_counter(), 0, 0.0
    model.train()
    with metrics_path.open("a") as metrics_file:
        while step < max_steps:
            offset = epoch_offset(cfg.seed, epoch, cfg.seq_len)
            if window == 0:
                state = model.init_state(cfg.batch_size, device)
            for x, y in batcher.epoch(offset, start=window):
                lr = learning_rate(step, cfg.lr, cfg.warmup_steps, decay_steps, cfg.schedule, cfg.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits, state = model(x, state)
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
                out_of_time = cfg.max_minutes is not None and time.perf_counter() - t_start >= cfg.max_minutes * 60
                if out_of_time:
                    max_steps = step  # validate, checkpoint and stop below, as at a planned end

                if step % 10 == 0 or step == max_steps or step % cfg.eval_interval == 0:
                    now = time.perf_counter()
                    cps = steps_since_log * chars_per_step / max(now - t_log, 1e-9)
                    row: dict[str, Any] = {
                        "step": step,
                        "epoch": epoch,
                        "train_loss": round(loss_since_log / steps_since_log, 5),
                        "lr": lr,
                        "chars_per_s": round(cps, 1),
                        "elapsed_s": round(now - t_start, 2),
                    }
                    bar.set_postfix(loss=f"{row['train_loss']:.3f}", chars_s=f"{cps:,.0f}")
                    bar.update(steps_since_log)
                    t_log, steps_since_log, loss_since_log = now, 0, 0.0
                    if step % cfg.eval_interval == 0 or step == max_steps:
                        last_val = evaluate_loss(model, val_ids)
                        row["val_loss"] = round(last_val, 5)
                        improved = last_val < best_val
                        best_val = min(best_val, last_val)
                        ckpt = checkpoint(last_val)
                        save_atomic(ckpt, last_path)
                        if improved:
                            save_atomic(ckpt, best_path)
                        bar.write(
                            f"step {step}: train {row['train_loss']:.4f}  val {last_val:.4f}"
                            f"  best {best_val:.4f}  {cps:,.0f} chars/s"
                        )
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    if "val_loss" in row:
                        plot_losses(_read_metrics(metrics_path, step), out / "loss.png")
                if step >= max_steps:
                    break
            else:
                epoch += 1
                window = 0
    bar.close()
    seconds = time.perf_counter() - t_start
    return TrainResult(
        step=step,
        best_val_loss=best_val,
        last_val_loss=last_val,
        out=out,
        chars_per_s=steps_this_run * chars_per_step / max(seconds, 1e-9),
        seconds=seconds,
    )

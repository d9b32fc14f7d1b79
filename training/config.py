"""The training settings and their defaults: the one place they are stated.

The CLI reads its defaults from here. This module imports no torch, so building the command
line costs nothing on a machine that only serves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from training.errors import InvalidSetting, check
from training.schedule import SCHEDULES

if TYPE_CHECKING:
    from training.model import ModelConfig

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    data: list[str]
    out: str = "runs/default"
    cell: str = "lstm"
    layers: int = 2
    hidden: int = 256
    embedding: int = 64
    dropout: float = 0.0
    embedding_dropout: float = 0.0
    forget_bias: float | None = None  # initial bias of the forget (LSTM) or update (GRU) gate
    seq_len: int = 128
    batch_size: int = 64  # the whole batch; under torchrun each process reads batch_size / world_size lanes
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    lr_decay_steps: int | None = None  # defaults to max_steps, as nanoGPT's lr_decay_iters
    max_steps: int | None = None
    epochs: float | None = None
    # Wall-clock budget: stop, validate and checkpoint when spent. Given alone, the run lasts
    # exactly this long and the learning-rate schedule runs over the time instead of the steps.
    max_minutes: float | None = None
    grad_clip: float = 1.0
    val_fraction: float = 0.1
    eval_interval: int = 250
    seed: int = 1337
    device: str = "auto"
    resume: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be at least 0, got {self.weight_decay}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be at least 0, got {self.warmup_steps}")
        check(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.grad_clip > 0, "grad_clip", f"must be positive, got {self.grad_clip}")
        check(self.eval_interval >= 1, "eval_interval", f"must be at least 1, got {self.eval_interval}")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", f"must be at least 1, got {self.max_steps}")
        check(self.epochs is None or self.epochs > 0, "epochs", f"must be positive, got {self.epochs}")
        check(
            self.max_minutes is None or self.max_minutes > 0,
            "max_minutes",
            f"must be positive, got {self.max_minutes}",
        )
        check(
            self.lr_decay_steps is None or self.lr_decay_steps >= 1,
            "lr_decay_steps",
            f"must be at least 1, got {self.lr_decay_steps}",
        )
        if self.max_steps is not None and self.epochs is not None:
            raise InvalidSetting("give max_steps or epochs, not both", ("max_steps", "epochs"))
        check(self.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")

    @property
    def time_only(self) -> bool:
        """Only a wall-clock budget was given: the run stops on time, not after a step count."""
        return self.max_minutes is not None and self.max_steps is None and self.epochs is None

    def model_config(self, vocab_size: int) -> ModelConfig:
        from training.model import ModelConfig

        return ModelConfig(
            vocab_size=vocab_size,
            cell=self.cell,
            num_layers=self.layers,
            hidden_size=self.hidden,
            embedding_size=self.embedding,
            dropout=self.dropout,
            embedding_dropout=self.embedding_dropout,
        )


def default(name: str) -> Any:
    """The default of one TrainConfig field (for the CLI's help and argparse defaults)."""
    found = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    return found.default

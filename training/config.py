"""The training settings, stated once: each field's default, type and command-line help.

`charstream train` has one flag per field, made from these declarations (training/cli.py):
`embedding_dropout` is `--embedding-dropout`, with the field's type and default; the field's
metadata holds its help and any further argparse keywords. This module imports no torch, so
building the command line costs nothing on a machine that only serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from exports.cli import setting
from training.errors import InvalidSetting, check
from training.schedule import SCHEDULES

if TYPE_CHECKING:
    from training.model import ModelConfig

DEVICES = ("auto", "cpu", "cuda")
# Characters read per periodic validation by default: a few seconds of a 2x512 model's time on
# two cores, against minutes of training between validations at the default --eval-interval.
EVAL_CHARS = 250_000
LR = 2e-3
FINE_TUNE_LR = 5e-4
# As training/precision.py, which imports torch; this module must not.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    data: list[str] = field(metadata={"help": "file(s) or a folder of UTF-8 text", "nargs": "+"})
    out: str = setting("runs/default", "folder for best.pt, last.pt, metrics")
    cell: str = setting("lstm", "lstm, gru or rnn (vanilla tanh RNN)")
    # Named as ModelConfig and the exported manifest name them; the aliases are the flags' earlier names.
    num_layers: int = setting(2, "stacked recurrent layers", aliases=("--layers",))
    hidden_size: int = setting(256, "units (state size) per recurrent layer", aliases=("--hidden",))
    embedding_size: int = setting(64, "size of a character's embedding", aliases=("--embedding",))
    dropout: float = setting(0.0, "between layers and before the head")
    embedding_dropout: float = setting(0.0, "on the embedded chars")
    weight_drop: float = setting(0.0, "drop units of the recurrent matrices (DropConnect, as AWD-LSTM), per window")
    forget_bias: float | None = setting(None, "initial bias of the LSTM forget gate (GRU update gate), e.g. 1")
    seq_len: int = setting(128, "characters per window of truncated backpropagation through time")
    # Under torchrun each process reads batch_size / world_size lanes.
    batch_size: int = setting(64, "whole batch, split over torchrun processes")
    # None: LR, or FINE_TUNE_LR with --init-from (see peak_lr).
    lr: float | None = setting(
        None, "peak learning rate, reached at the end of the warm-up (default 2e-3; 5e-4 with --init-from)"
    )
    weight_decay: float = setting(0.01, "AdamW weight decay of the weight matrices (not of the biases)")
    warmup_steps: int = setting(100, "steps of linear learning-rate warm-up")
    schedule: str = setting("cosine", "cosine, step or constant")
    min_lr_ratio: float = setting(0.1, "the decayed learning rate's floor, as a fraction of --lr")
    # As nanoGPT's lr_decay_iters.
    lr_decay_steps: int | None = setting(None, "steps the learning rate decays over (default: the run's steps)")
    max_steps: int | None = setting(None, "stop after this many steps", exclusive="length")
    epochs: float | None = setting(None, "stop after this many passes over the training text", exclusive="length")
    # Wall-clock budget: stop, validate and checkpoint when spent. Given alone, the run lasts
    # exactly this long and the learning-rate schedule runs over the time instead of the steps.
    # With none of max_steps, epochs and max_minutes the run is one epoch.
    max_minutes: float | None = setting(None, "wall-time budget; given alone, the run lasts exactly this long")
    grad_clip: float = setting(1.0, "largest gradient norm; a larger gradient is scaled down to it")
    val_fraction: float = setting(0.1, "the end of the text held out for validation, as a fraction")
    eval_interval: int = setting(250, "validate and checkpoint every this many steps (and at the end)")
    # The final validation reads the whole split, as `charstream eval` does.
    eval_chars: int = setting(
        EVAL_CHARS, "characters read per periodic validation: a fixed sample of the split (0: all of it)"
    )
    seed: int = setting(1337, "seed of the initial weights, dropout masks and epoch window shifts")
    device: str = setting("auto", "auto, cpu or cuda")
    # Autocast of the forward pass and the loss; weights, optimizer state and checkpoints stay fp32.
    precision: str = setting(
        "auto", "auto, fp32, bf16 or fp16 (CUDA only); auto: bf16 on a CPU with AMX or a CUDA GPU with bf16"
    )
    resume: bool = setting(False, "continue from OUT/last.pt")
    # Fine-tuning (training/prior.py): the architecture is the prior's, the layer flags are not read.
    init_from: str | None = setting(
        None, "start from a trained model: a checkpoint (.pt), an exported model folder or its .onnx"
    )
    freeze_layers: int = setting(0, "with --init-from: keep the lowest K recurrent layers as the prior has them")
    progress: bool = setting(True, "no progress bar")

    def validate(self) -> None:
        check(self.lr is None or self.lr > 0, "lr", f"must be positive, got {self.lr}")
        check(self.freeze_layers >= 0, "freeze_layers", f"must be at least 0, got {self.freeze_layers}")
        if self.freeze_layers and self.init_from is None:
            raise InvalidSetting(
                "freeze_layers needs init_from, the model to fine-tune", ("freeze_layers", "init_from")
            )
        check(self.weight_decay >= 0, "weight_decay", f"must be at least 0, got {self.weight_decay}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be at least 0, got {self.warmup_steps}")
        check(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.grad_clip > 0, "grad_clip", f"must be positive, got {self.grad_clip}")
        check(self.eval_interval >= 1, "eval_interval", f"must be at least 1, got {self.eval_interval}")
        check(self.eval_chars >= 0, "eval_chars", f"must be at least 0, got {self.eval_chars}")
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
        check(
            self.precision in PRECISIONS,
            "precision",
            f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )

    @property
    def peak_lr(self) -> float:
        """The learning rate asked for, or the default: lower when fine-tuning, so the prior is not undone."""
        if self.lr is not None:
            return self.lr
        return FINE_TUNE_LR if self.init_from else LR

    @property
    def time_only(self) -> bool:
        """Only a wall-clock budget was given: the run stops on time, not after a step count."""
        return self.max_minutes is not None and self.max_steps is None and self.epochs is None

    def model_config(self, vocab_size: int) -> ModelConfig:
        from training.model import ModelConfig

        return ModelConfig(
            vocab_size=vocab_size,
            cell=self.cell,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            embedding_size=self.embedding_size,
            dropout=self.dropout,
            embedding_dropout=self.embedding_dropout,
            weight_drop=self.weight_drop,
        )

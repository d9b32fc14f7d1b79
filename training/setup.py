"""What a training run holds fixed, built from its settings: the data, the model and its optimizer,
the precision and how far the run goes; and the plan said before the first step."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from training import distributed
from training.batching import LaneBatcher
from training.calibrate import measured_choice
from training.config import TrainConfig
from training.corpus import Corpus, Vocabulary, read_corpus
from training.errors import InvalidSetting
from training.model import CharRNN, State
from training.precision import Precision, resolve
from training.prior import Prior, extend, freeze_layers, load_prior, vocabulary


@dataclass
class Setup:
    """What a run holds fixed: its settings, data, model and optimizer, and how far it goes."""

    cfg: TrainConfig
    ranks: distributed.Ranks
    device: torch.device
    out: Path
    corpus: Corpus
    vocab: Vocabulary
    train_ids: Tensor
    val_ids: Tensor
    batcher: LaneBatcher
    lanes: slice  # this process's rows of the batch
    model: CharRNN
    optimizer: torch.optim.Optimizer
    precision: Precision
    scaler: torch.amp.GradScaler  # scales the fp16 loss; disabled (a pass-through) otherwise
    max_steps: int | None  # None: the clock ends the run
    decay_steps: int
    prior: Prior | None = None  # the model a fine-tune started from (--init-from)
    new_chars: tuple[str, ...] = ()  # the corpus's characters the prior lacked, appended to its vocabulary

    @property
    def budget_s(self) -> float | None:
        return None if self.cfg.max_minutes is None else self.cfg.max_minutes * 60

    @property
    def chars_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def fresh_state(self) -> State:
        return self.model.init_state(self.lanes.stop - self.lanes.start, self.device)

    def say(self, text: str) -> None:
        if self.ranks.is_main:
            print(text, flush=True)


def build_setup(cfg: TrainConfig, ranks: distributed.Ranks) -> Setup:
    """The data, the model and its optimizer; every process builds the same initial weights."""
    # Read top to bottom: folder, corpus and vocabulary (a fine-tune's included), model, precision,
    # optimizer. Each step needs the ones before it.
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InvalidSetting(f"out {out} exists and is not a folder", ("out",))
    device = ranks.device(cfg.device)
    data = _data(cfg)
    cfg = data.cfg  # a fine-tune's settings name the prior's architecture
    batcher = LaneBatcher(data.train_ids, cfg.batch_size, cfg.seq_len)
    max_steps: int | None
    if cfg.time_only:
        max_steps = None  # the clock ends the run
    else:
        max_steps = cfg.max_steps or max(1, round((cfg.epochs or 1.0) * batcher.batches_per_epoch))
    model = _model(cfg, data, ranks, device)
    precision = resolve(cfg.precision, device, model.config.cell, _measure(cfg, ranks, model, device, out))
    return Setup(
        cfg=cfg,
        ranks=ranks,
        device=device,
        out=out,
        corpus=data.corpus,
        vocab=data.vocab,
        train_ids=data.train_ids,
        val_ids=data.val_ids,
        batcher=batcher,
        lanes=ranks.lanes(cfg.batch_size),
        model=model,
        optimizer=_optimizer(model, cfg),
        precision=precision,
        scaler=torch.amp.GradScaler(device.type, enabled=precision.scales_loss),
        max_steps=max_steps,
        decay_steps=cfg.lr_decay_steps or max_steps or 1,
        prior=data.prior,
        new_chars=data.new_chars,
    )


@dataclass(frozen=True)
class _Data:
    cfg: TrainConfig
    corpus: Corpus
    vocab: Vocabulary
    train_ids: Tensor
    val_ids: Tensor
    prior: Prior | None
    new_chars: tuple[str, ...]


def _data(cfg: TrainConfig) -> _Data:
    """The corpus, its split and the vocabulary over both halves, so validation has no unknowns.

    A fine-tune keeps the prior's vocabulary and appends the corpus's new characters."""
    corpus = read_corpus(cfg.data)
    prior = load_prior(cfg.init_from) if cfg.init_from else None
    new_chars: list[str] = []
    if prior is not None:
        new_chars = sorted(set(corpus.text) - set(prior.vocab.chars))
        vocab = vocabulary(prior, new_chars)
        # The run's settings name the architecture it really has (checkpoints record them).
        pc = prior.config
        cfg = dataclasses.replace(
            cfg, cell=pc.cell, num_layers=pc.num_layers, hidden_size=pc.hidden_size, embedding_size=pc.embedding_size
        )
    else:
        vocab = Vocabulary.from_text(corpus.text)
    train_text, val_text = corpus.split(cfg.val_fraction)
    train_ids = torch.tensor(vocab.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(vocab.encode(val_text), dtype=torch.long)
    return _Data(cfg, corpus, vocab, train_ids, val_ids, prior, tuple(new_chars))


def _model(cfg: TrainConfig, data: _Data, ranks: distributed.Ranks, device: torch.device) -> CharRNN:
    """Every process builds the same initial weights from the same seed; DDP checks and broadcasts them anyway."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if data.prior is None:
        model = CharRNN(cfg.model_config(len(data.vocab)))
        if cfg.forget_bias is not None:
            model.set_forget_bias(cfg.forget_bias)
    else:
        # The prior's trained weights, never re-initialised (no forget bias); a fresh optimizer.
        model, _ = extend(data.prior, data.corpus.text, cfg.dropout, cfg.embedding_dropout, cfg.weight_drop)
        freeze_layers(model, cfg.freeze_layers)
    model = model.to(device)
    if ranks.distributed:
        # Each process draws its own dropout masks, as it reads its own lanes.
        torch.manual_seed(cfg.seed + ranks.rank)
        random.seed(cfg.seed + ranks.rank)
    return model


def _optimizer(model: CharRNN, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW that decays the matrices only, not the biases (nanoGPT's grouping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.peak_lr,
        betas=(0.9, 0.99),
    )


def plan(setup: Setup) -> str:
    """How long and how far the run will go, said before the first step."""
    cfg, mc, max_steps = setup.cfg, setup.model.config, setup.max_steps
    per_epoch = setup.batcher.batches_per_epoch
    head = (
        f"training {mc.cell} {mc.num_layers}x{mc.hidden_size} ({setup.model.num_parameters() / 1e6:.2f}M parameters) "
        f"on {setup.corpus.name}: {setup.train_ids.numel():,} training chars, {per_epoch:,} steps of "
        f"{cfg.batch_size} x {cfg.seq_len} chars per epoch"
    )
    budget = f"{cfg.max_minutes:g} min" if cfg.max_minutes is not None else None
    if max_steps is None:
        until = f"for {budget} (the learning rate decays over the time; steps as fast as this machine goes)"
    else:
        until = f"to step {max_steps:,} ({max_steps / per_epoch:.1f} epochs)"
        if budget:
            until += f" or for {budget}, whichever comes first"
    precision = setup.precision
    mixed = "fp32 throughout" if precision.dtype is None else f"{precision.name} autocast, fp32 weights"
    start = "" if setup.prior is None else _fine_tune_plan(setup) + "\n"
    return (
        f"{start}{head}\n  runs {until}; validates every {cfg.eval_interval} steps{_sample(setup)} and at the end"
        f"\n  precision {precision.name} ({mixed}; {precision.reason})"
    )


def _fine_tune_plan(setup: Setup) -> str:
    """What a fine-tune starts from, said before the plan."""
    assert setup.prior is not None
    new = ", ".join(repr(ch) for ch in setup.new_chars[:20]) + (" ..." if len(setup.new_chars) > 20 else "")
    frozen = f"; the lowest {setup.cfg.freeze_layers} recurrent layer(s) frozen" if setup.cfg.freeze_layers else ""
    added = f"{len(setup.new_chars)} new character(s) added to its {len(setup.prior.vocab)}"
    return (
        f"fine-tuning from {setup.prior.path} (its architecture; fresh optimizer, "
        f"peak lr {setup.cfg.peak_lr:g}{frozen}); {added}" + (f": {new}" if new else "")
    )


def _sample(setup: Setup) -> str:
    """What a periodic validation reads, when it is less than the whole split."""
    held_out = setup.val_ids.numel() - 1
    if not 0 < setup.cfg.eval_chars < held_out:
        return ""
    return f" on a fixed sample of {setup.cfg.eval_chars:,} of the {held_out:,} validation chars,"


PRECISION_RECORD = "precision.json"  # in the run's folder: what `auto` measured


def _measure(
    cfg: TrainConfig, ranks: distributed.Ranks, model: CharRNN, device: torch.device, out: Path
) -> Callable[[], tuple[str, str]]:
    """How `auto` decides: the main process times the candidates on this run's model and per-process
    batch; under DDP every process then trains in the precision it chose."""
    lanes = ranks.lanes(cfg.batch_size)
    batch = len(range(cfg.batch_size)[lanes])

    def measure() -> tuple[str, str]:
        choice = ("fp32", "")
        if ranks.is_main:
            config = model.config
            choice = measured_choice(
                model, config.cell, config.vocab_size, device, batch, cfg.seq_len, out / PRECISION_RECORD
            )
        if ranks.distributed:
            shared = [choice]
            torch.distributed.broadcast_object_list(shared, src=0)
            choice = shared[0]
        return choice

    return measure

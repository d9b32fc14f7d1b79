"""The training loop: truncated BPTT with carried state, AdamW, clipping, validation, checkpoints.

Reads top to bottom: setup (data, model, optimizer), resume, the loop, then logging, validation
and the checkpoint. What a run holds fixed is a `Setup`; what changes from step to step (the
counters, the carried state, the best loss, the clocks) is one `RunState`, which a checkpoint
saves and `--resume` restores. Under torchrun the same loop runs in every process with
DistributedDataParallel (training/distributed.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
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
from training.corpus import Corpus, Vocabulary, read_corpus
from training.errors import InvalidSetting, UserError
from training.evaluate import evaluate
from training.model import CharRNN, ModelConfig, State
from training.plot import plot_losses
from training.precision import Precision, resolve
from training.prior import Prior, extend, freeze_layers, load_prior, vocabulary
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


@dataclass
class RunState:
    """What changes from step to step.

    The fields up to `seconds_before` go into a checkpoint and come back with --resume; the
    clocks and counters after them belong to this run.
    """

    carried: State  # carried from window to window: (layers, this process's lanes, hidden) each
    step: int = 0
    epoch: int = 0
    window: int = 0  # the next window of the epoch
    best_val: float = float("inf")
    last_val: float = float("nan")
    seconds_before: float = 0.0  # training time of earlier runs of the same training (resumes)
    # This run's clocks and counters, and the training loss summed since the last log row.
    t_start: float = 0.0  # set when the loop starts
    t_log: float = 0.0
    steps_this_run: int = 0
    steps_since_log: int = 0
    loss_since_log: float = 0.0
    estimated: bool = False  # the time budget's estimate of the steps left has been said

    def start_clocks(self) -> None:
        self.t_start = self.t_log = time.perf_counter()

    def training_seconds(self) -> float:
        """Training time of this training so far, earlier runs included."""
        return self.seconds_before + time.perf_counter() - self.t_start


def _plan(setup: Setup) -> str:
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
    setup = _setup(cfg, ranks)
    run = _resume(setup) if cfg.resume else _start(setup)
    return _loop(setup, run)


def _setup(cfg: TrainConfig, ranks: distributed.Ranks) -> Setup:
    """The data, the model and its optimizer; every process builds the same initial weights."""
    # Read top to bottom: folder, corpus and vocabulary (a fine-tune's included), model, precision,
    # optimizer. Each step needs the ones before it, so they stay in one function.
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InvalidSetting(f"out {out} exists and is not a folder", ("out",))
    device = ranks.device(cfg.device)

    # Data: the vocabulary covers train and validation text, so validation has no unknowns. A
    # fine-tune keeps the prior's vocabulary and appends the corpus's new characters.
    corpus = read_corpus(cfg.data)
    prior = load_prior(cfg.init_from) if cfg.init_from else None
    new_chars: list[str] = []
    if prior is not None:
        new_chars = sorted(set(corpus.text) - set(prior.vocab.chars))
        vocab = vocabulary(prior, new_chars)
        # The run's settings name the architecture it really has (checkpoints record them).
        pc = prior.config
        cfg = dataclasses.replace(
            cfg, cell=pc.cell, layers=pc.num_layers, hidden=pc.hidden_size, embedding=pc.embedding_size
        )
    else:
        vocab = Vocabulary.from_text(corpus.text)
    train_text, val_text = corpus.split(cfg.val_fraction)
    train_ids = torch.tensor(vocab.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(vocab.encode(val_text), dtype=torch.long)
    batcher = LaneBatcher(train_ids, cfg.batch_size, cfg.seq_len)
    max_steps: int | None
    if cfg.time_only:
        max_steps = None  # the clock ends the run
    else:
        max_steps = cfg.max_steps or max(1, round((cfg.epochs or 1.0) * batcher.batches_per_epoch))

    # Model and optimizer: decay matrices only, not biases (nanoGPT's grouping). Every process
    # builds the same initial weights from the same seed; DDP checks and broadcasts them anyway.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if prior is None:
        model = CharRNN(cfg.model_config(len(vocab)))
        if cfg.forget_bias is not None:
            model.set_forget_bias(cfg.forget_bias)
    else:
        # The prior's trained weights, never re-initialised (no forget bias); a fresh optimizer.
        model, _ = extend(prior, corpus.text, cfg.dropout, cfg.embedding_dropout, cfg.weight_drop)
        freeze_layers(model, cfg.freeze_layers)
    model = model.to(device)
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
        lr=cfg.peak_lr,
        betas=(0.9, 0.99),
    )
    precision = resolve(cfg.precision, device, model.config.cell)
    return Setup(
        cfg=cfg,
        ranks=ranks,
        device=device,
        out=out,
        corpus=corpus,
        vocab=vocab,
        train_ids=train_ids,
        val_ids=val_ids,
        batcher=batcher,
        lanes=ranks.lanes(cfg.batch_size),
        model=model,
        optimizer=optimizer,
        precision=precision,
        scaler=torch.amp.GradScaler(device.type, enabled=precision.scales_loss),
        max_steps=max_steps,
        decay_steps=cfg.lr_decay_steps or max_steps or 1,
        prior=prior,
        new_chars=tuple(new_chars),
    )


def _start(setup: Setup) -> RunState:
    """A new run: an empty metrics log, zero carried state."""
    if setup.ranks.is_main:
        setup.out.mkdir(parents=True, exist_ok=True)
        setup.metrics_path.write_text("")
    return RunState(carried=setup.fresh_state())


def _resume(setup: Setup) -> RunState:
    """The run as last.pt left it: weights, optimizer, counters, carried state and random generators."""
    if not setup.last_path.exists():
        raise UserError(f"resume asked for, but {setup.last_path} does not exist")
    ckpt = load_checkpoint(setup.last_path, map_location=setup.device)
    _check_same_prior(setup, ckpt.get("init_from"))
    if ckpt["vocab"] != setup.vocab.to_json():
        raise UserError(f"cannot resume: {setup.last_path} was trained on a different vocabulary")
    if ModelConfig.from_dict(ckpt["model_config"]) != setup.model.config:
        raise UserError(
            f"cannot resume: {setup.last_path} has model {ckpt['model_config']}, "
            f"the settings ask for {setup.model.config.to_dict()}"
        )
    carried = ckpt["carried_state"]  # every lane, (layers, batch_size, hidden) each
    if carried and carried[0].shape[1] != setup.cfg.batch_size:
        raise InvalidSetting(
            f"cannot resume: {setup.last_path} was trained with batch_size {carried[0].shape[1]}, "
            f"not {setup.cfg.batch_size}",
            ("batch_size",),
        )
    setup.model.load_state_dict(ckpt["model_state"])
    setup.optimizer.load_state_dict(ckpt["optimizer_state"])
    if ckpt.get("scaler_state") and setup.scaler.is_enabled():
        setup.scaler.load_state_dict(ckpt["scaler_state"])
    run = RunState(
        carried=tuple(t[:, setup.lanes].to(setup.device) for t in carried),
        step=ckpt["step"],
        epoch=ckpt["epoch"],
        window=ckpt["window"],
        best_val=ckpt["best_val_loss"],
        last_val=ckpt["val_loss"],
        seconds_before=float(ckpt.get("train_seconds", 0.0)),
    )
    rng_ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if len(rng_ranks) == setup.ranks.world_size:
        _set_rng_state(rng_ranks[setup.ranks.rank])
    if setup.ranks.is_main:
        for stray in remove_stray_temp_files(setup.last_path, setup.best_path):
            setup.say(f"removed {stray.name}, left by a run stopped while it wrote a checkpoint")
        metrics = _read_metrics(setup.metrics_path, run.step)
        setup.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if setup.max_steps is not None and run.step >= setup.max_steps:
        raise InvalidSetting(
            f"checkpoint is already at step {run.step}; raise max_steps to train further", ("max_steps",)
        )
    if setup.budget_s is not None and run.seconds_before >= setup.budget_s:
        raise InvalidSetting(
            f"checkpoint has already trained {run.seconds_before / 60:.1f} min; raise max_minutes to train further",
            ("max_minutes",),
        )
    return run


def _check_same_prior(setup: Setup, started_from: dict[str, Any] | None) -> None:
    """A fine-tune resumes from the same prior it started from; a run from scratch without one."""
    if started_from is None and setup.prior is None:
        return
    if started_from is None:
        raise InvalidSetting(
            f"cannot resume: {setup.last_path} was trained from scratch; leave out init_from", ("init_from",)
        )
    if setup.prior is None:
        raise InvalidSetting(
            f"cannot resume: {setup.last_path} was fine-tuned from {started_from['path']}; give init_from again",
            ("init_from",),
        )
    if started_from["sha256"] != setup.prior.sha256:
        raise InvalidSetting(
            f"cannot resume: {setup.last_path} was fine-tuned from {started_from['path']} "
            f"(sha256 {started_from['sha256'][:12]}), not from {setup.prior.path} (sha256 {setup.prior.sha256[:12]})",
            ("init_from",),
        )


def _loop(setup: Setup, run: RunState) -> TrainResult:
    """Windows of carried-state lanes, epoch after epoch, until the step count or the time budget is reached."""
    net: torch.nn.Module = setup.model
    if setup.ranks.distributed:
        device_ids = [setup.device.index] if setup.device.type == "cuda" else None
        net = DistributedDataParallel(setup.model, device_ids=device_ids)

    from tqdm import tqdm

    setup.say(_plan(setup))
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
            # Every process stops at the same step: the first to run out of time decides.
            out_of_time = setup.ranks.any(setup.budget_s is not None and spent >= setup.budget_s, setup.device)
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
            plot_losses(_read_metrics(setup.metrics_path, run.step), setup.out / "loss.png")


def _validate(setup: Setup, run: RunState, row: dict[str, Any], spent: float, final: bool) -> None:
    """Process 0 measures the validation loss and writes last.pt (and best.pt when it improved).

    A periodic validation reads the fixed sample of --eval-chars characters; the final one reads
    the whole split. The sample estimates the same loss, so both compete for best.pt.
    """
    every_lane = setup.ranks.gather_lanes(run.carried)
    rngs = setup.ranks.gather_objects(_rng_state())
    if setup.ranks.is_main:
        bound = None if final else setup.cfg.eval_chars or None
        run.last_val, chars = evaluate(setup.model, setup.val_ids, max_chars=bound, progress=setup.cfg.progress)
        row["val_loss"] = round(run.last_val, 5)
        row["val_chars"] = chars
        improved = run.last_val < run.best_val
        run.best_val = min(run.best_val, run.last_val)
        ckpt = _checkpoint(setup, run, every_lane, rngs, spent)
        save_atomic(ckpt, setup.last_path)
        if improved:
            save_atomic(ckpt, setup.best_path)
    run.last_val = setup.ranks.from_main(run.last_val, setup.device)
    run.best_val = setup.ranks.from_main(run.best_val, setup.device)


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

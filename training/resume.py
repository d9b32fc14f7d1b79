"""What changes from step to step of a training run (`RunState`), how a run starts, and how
`--resume` restores it exactly from last.pt: weights, optimizer, counters, carried state and the
random generators of every process."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import load_checkpoint, remove_stray_temp_files
from training.errors import InvalidSetting, UserError
from training.model import ModelConfig, State
from training.setup import Setup


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
    # Where this run's time went besides the steps: validations and checkpoint writes.
    val_seconds: float = 0.0
    val_runs: int = 0
    checkpoint_seconds: float = 0.0
    last_validation_s: float = 0.0  # the last validation with its checkpoint writes

    def start_clocks(self) -> None:
        self.t_start = self.t_log = time.perf_counter()

    def training_seconds(self) -> float:
        """Training time of this training so far, earlier runs included."""
        return self.seconds_before + time.perf_counter() - self.t_start


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_metrics(path: Path, upto_step: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto_step]


def start(setup: Setup) -> RunState:
    """A new run: an empty metrics log, zero carried state."""
    if setup.ranks.is_main:
        setup.out.mkdir(parents=True, exist_ok=True)
        setup.metrics_path.write_text("")
    return RunState(carried=setup.fresh_state())


def resume(setup: Setup) -> RunState:
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
        set_rng_state(rng_ranks[setup.ranks.rank])
    if setup.ranks.is_main:
        for stray in remove_stray_temp_files(setup.last_path, setup.best_path):
            setup.say(f"removed {stray.name}, left by a run stopped while it wrote a checkpoint")
        metrics = read_metrics(setup.metrics_path, run.step)
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

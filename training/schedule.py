"""The learning-rate schedule: linear warm-up, then cosine or step decay, or constant."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "step", "constant")


def learning_rate(
    step: int,
    base_lr: float,
    warmup_steps: int,
    decay_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    step_every: int = 0,
    step_gamma: float = 0.5,
    progress: float | None = None,
) -> float:
    """LR for optimizer step `step` (0-based); a pure function, so resume needs only the step.

    `progress` (0..1), when given, says how far the decay is instead of the step count: a run
    bounded only by wall-clock time decays over the fraction of its time spent.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    min_lr = base_lr * min_lr_ratio
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        if progress is not None:
            drops = int(min(1.0, progress) * 4)  # four drops over the budget, as over decay_steps below
        else:
            drops = (step - warmup_steps) // (step_every or max(1, decay_steps // 4))
        return max(min_lr, base_lr * step_gamma**drops)
    if progress is None:
        progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))

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
) -> float:
    """LR for optimizer step `step` (0-based); a pure function, so resume needs only the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    min_lr = base_lr * min_lr_ratio
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        every = step_every or max(1, decay_steps // 4)
        return max(min_lr, base_lr * step_gamma ** ((step - warmup_steps) // every))
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))

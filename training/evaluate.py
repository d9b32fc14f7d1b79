"""Validation loss of a model on a text, in nats/char, with the state carried through it."""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from training.model import CharRNN

LN2 = math.log(2.0)
# Evaluation reads the text as this many lanes, this many characters per call. The export's
# onnxruntime measurement uses the same numbers, so its losses compare with these.
EVAL_LANES = 8
EVAL_WINDOW = 256
# A bounded validation (--eval-chars) reads this many lanes spread evenly over the split, so its
# sample covers the whole split and a batch of 32 keeps the CPU's matrix units busier than 8
# would; each lane is at least SAMPLE_MIN_LANE characters long, so nearly every character is
# predicted with a long history, as in the full measurement.
SAMPLE_LANES = 32
SAMPLE_MIN_LANE = 2048

Ids = TypeVar("Ids", Tensor, np.ndarray[Any, Any])


def eval_lanes(ids: Ids, lanes: int = EVAL_LANES) -> tuple[Ids, Ids]:
    """Inputs and targets (lanes, lane_len) of a token sequence cut into contiguous lanes.

    Works on a torch tensor or a numpy array alike. Every character but the first of each
    lane is predicted with its full history, the way a served session sees it.
    """
    n = ids.shape[0] - 1
    lanes = max(1, min(lanes, n // 2 or 1))
    lane_len = n // lanes
    x = ids[: lanes * lane_len].reshape(lanes, lane_len)
    y = ids[1 : lanes * lane_len + 1].reshape(lanes, lane_len)
    return x, y


def sample_lanes(ids: Tensor, max_chars: int) -> tuple[Tensor, Tensor]:
    """Inputs and targets of a fixed sample of at most `max_chars` predictions: lanes spread over `ids`.

    The same `ids` and `max_chars` give the same sample every time, so periodic validations
    compare with one another. Up to SAMPLE_LANES lanes of at least SAMPLE_MIN_LANE characters
    each (fewer lanes when `max_chars` is small), their starts evenly spaced from the first
    character to the last lane that fits.
    """
    n = ids.shape[0] - 1
    lanes = max(1, min(SAMPLE_LANES, max_chars // SAMPLE_MIN_LANE))
    lane_len = min(max_chars // lanes, n)
    stride = (n - lane_len) // max(lanes - 1, 1)
    starts = [i * stride for i in range(lanes)]
    x = torch.stack([ids[s : s + lane_len] for s in starts])
    y = torch.stack([ids[s + 1 : s + lane_len + 1] for s in starts])
    return x, y


@torch.no_grad()
def evaluate_loss(
    model: CharRNN,
    ids: Tensor,
    lanes: int = EVAL_LANES,
    window: int = EVAL_WINDOW,
    max_chars: int | None = None,
    progress: bool = False,
) -> float:
    """Mean next-character cross-entropy (nats/char), state carried window to window, always in fp32.

    Reads all of `ids` in `lanes` lanes, or with `max_chars` below its length the fixed sample of
    `sample_lanes`. `progress` shows a progress bar on stderr while it reads.
    """
    return evaluate(model, ids, lanes, window, max_chars, progress)[0]


@torch.no_grad()
def evaluate(
    model: CharRNN,
    ids: Tensor,
    lanes: int = EVAL_LANES,
    window: int = EVAL_WINDOW,
    max_chars: int | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """As `evaluate_loss`, with the number of characters it predicted."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    device = model.head.weight.device
    bounded = max_chars is not None and 0 < max_chars < ids.shape[0] - 1
    x, y = sample_lanes(ids, max_chars) if bounded and max_chars else eval_lanes(ids, lanes)
    x, y = x.to(device), y.to(device)
    state = model.init_state(x.shape[0], device)
    total, count = 0.0, 0
    with tqdm(
        total=y.numel(), disable=not progress, desc="validating", unit="char", unit_scale=True, leave=False
    ) as bar:
        for start in range(0, x.shape[1], window):
            xs, ys = x[:, start : start + window], y[:, start : start + window]
            logits, state = model(xs, state)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1), reduction="sum").item()
            count += ys.numel()
            bar.update(ys.numel())
    model.train(was_training)
    return total / count, count


def unigram_entropy(ids: Tensor, vocab_size: int) -> float:
    """Entropy (nats/char) of the character frequencies: what a model with no context scores."""
    counts = torch.bincount(ids, minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())

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


@torch.no_grad()
def evaluate_loss(model: CharRNN, ids: Tensor, lanes: int = EVAL_LANES, window: int = EVAL_WINDOW) -> float:
    """Mean next-character cross-entropy over all of `ids` (nats/char), state carried window to window."""
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    x, y = eval_lanes(ids, lanes)
    x, y = x.to(device), y.to(device)
    state = model.init_state(x.shape[0], device)
    total, count = 0.0, 0
    for start in range(0, x.shape[1], window):
        xs, ys = x[:, start : start + window], y[:, start : start + window]
        logits, state = model(xs, state)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1), reduction="sum").item()
        count += ys.numel()
    model.train(was_training)
    return total / count


def unigram_entropy(ids: Tensor, vocab_size: int) -> float:
    """Entropy (nats/char) of the character frequencies: what a model with no context scores."""
    counts = torch.bincount(ids, minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())

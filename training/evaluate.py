"""Validation loss of a model on a text, in nats/char, with the state carried through it."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from training.model import CharRNN

LN2 = math.log(2.0)


@torch.no_grad()
def evaluate_loss(model: CharRNN, ids: Tensor, lanes: int = 8, window: int = 256) -> float:
    """Mean next-character cross-entropy over all of `ids` (nats/char).

    The text is read as `lanes` contiguous lanes with the state carried from window to
    window, so every character but the first of each lane is predicted with its full
    history, the way a served session sees it.
    """
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    n = ids.numel() - 1
    lanes = max(1, min(lanes, n // 2 or 1))
    lane_len = n // lanes
    x = ids[: lanes * lane_len].view(lanes, lane_len).to(device)
    y = ids[1 : lanes * lane_len + 1].view(lanes, lane_len).to(device)
    state = model.init_state(lanes, device)
    total, count = 0.0, 0
    for start in range(0, lane_len, window):
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

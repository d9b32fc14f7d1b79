"""Measurements of one exported file: validation loss and agreement, step latency."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from exports import contract
from training.evaluate import EVAL_WINDOW, eval_lanes
from training.export.graph import ort_feed


def ort_lanes_eval(
    session: Any, cell: str, layers: int, hidden: int, ids: np.ndarray, window: int = EVAL_WINDOW
) -> tuple[float, np.ndarray]:
    """Loss (nats/char) over `ids` read as carried-state lanes, and the argmax at every position.

    The lanes are cut as training's own evaluation cuts them (training/evaluate.py), so the
    fp32 file's loss equals the checkpoint's validation loss.
    """
    x, y = eval_lanes(ids)
    lanes, lane_len = x.shape
    state = [np.zeros((layers, lanes, hidden), np.float32) for _ in contract.state_names(cell)]
    total = 0.0
    argmax = np.empty_like(y)
    for start in range(0, lane_len, window):
        xs, ys = x[:, start : start + window], y[:, start : start + window]
        out = session.run(None, ort_feed(np.ascontiguousarray(xs), state, cell))
        logits, state = out[0].astype(np.float64), out[1:]
        m = logits.max(axis=-1, keepdims=True)
        logz = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]
        picked = np.take_along_axis(logits, ys[..., None], axis=-1)[..., 0]
        total += float((logz - picked).sum())
        argmax[:, start : start + window] = logits.argmax(axis=-1)
    return total / y.size, argmax


def step_latency_us(session: Any, cell: str, layers: int, hidden: int, batch: int = 1, runs: int = 300) -> float:
    """Median wall time of one single-character step for `batch` sessions, in microseconds."""
    tokens = np.zeros((batch, 1), np.int64)
    state = [np.zeros((layers, batch, hidden), np.float32) for _ in contract.state_names(cell)]
    feed = ort_feed(tokens, state, cell)
    for _ in range(20):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6

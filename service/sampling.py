"""Sampling the next character for every row of a batch, each row with its own parameters and RNG.

A row's result depends only on its own logits, parameters and uniform draw, so a session
samples the same text whether it is stepped alone or alongside others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_new_chars: int = 256
    stop: tuple[str, ...] = ()
    logprobs: bool = False


def sample_rows(
    logits: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    uniform: np.ndarray,
) -> np.ndarray:
    """Token ids (batch,) from logits (batch, vocab) with per-row temperature, top-k, top-p.

    One uniform draw per row picks from the filtered distribution by inverse CDF over the
    tokens sorted by probability, so filtering and drawing are vectorised across rows.
    """
    batch, vocab = logits.shape
    greedy = temperature <= 0.0
    z = logits.astype(np.float64) / np.where(greedy, 1.0, temperature)[:, None]
    order = np.argsort(-z, axis=1, kind="stable")  # (batch, vocab) most likely first
    zs = np.take_along_axis(z, order, axis=1)
    p = np.exp(zs - zs[:, :1])
    p /= p.sum(axis=1, keepdims=True)
    ranks = np.arange(vocab)[None, :]
    k = np.where(top_k > 0, top_k, vocab)[:, None]
    # Nucleus: keep a token while the mass of the tokens before it is still under top_p,
    # so the most likely token is always kept.
    before = np.cumsum(p, axis=1) - p
    keep = (ranks < k) & (before < top_p[:, None])
    p = np.where(keep, p, 0.0)
    cdf = np.cumsum(p, axis=1)
    picked = (cdf < (uniform * cdf[:, -1])[:, None]).sum(axis=1)
    picked = np.minimum(picked, keep.sum(axis=1) - 1)
    ids: np.ndarray = order[np.arange(batch), picked]
    if greedy.any():
        ids[greedy] = order[greedy, 0]
    return ids


def log_softmax_at(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The model's own log-probability (no temperature or filtering) of ids (batch,)."""
    z = logits.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    logz = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    out: np.ndarray = z[np.arange(z.shape[0]), ids] - logz
    return out


class StopMatcher:
    """Holds back text that could be the start of a stop sequence; cuts the stop sequence out.

    As OpenAI-style servers do, the stop sequence itself is not returned to the client.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Feed generated text; returns (text safe to send now, whether a stop sequence matched)."""
        if not self.stops:
            return text, False
        self.pending += text
        for stop in self.stops:
            at = self.pending.find(stop)
            if at >= 0:
                out, self.pending = self.pending[:at], ""
                return out, True
        # Release everything that cannot be the beginning of a stop sequence.
        for i in range(len(self.pending)):
            tail = self.pending[i:]
            if any(stop.startswith(tail) for stop in self.stops):
                out, self.pending = self.pending[:i], self.pending[i:]
                return out, False
        out, self.pending = self.pending, ""
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

"""Sampling the next character: the one definition of the sampling parameters, their bounds and
the sampler, shared by the service's batches, `charstream sample` and the edge runner.

numpy only, like the rest of this package. A row's result depends only on its own logits,
parameters and uniform draw, so a session samples the same text stepped alone or with others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Temperatures below this sample greedily, as vLLM does: dividing logits by a denormal temperature
# overflows to inf and the distribution is NaN (found by fuzzing with temperature 5e-324).
GREEDY_BELOW = 1e-5
# Past this the distribution is flat to float precision for any trained model: a larger value is
# a typo, refused rather than sampled as uniform noise.
TEMPERATURE_MAX = 10.0


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


class InvalidSampling(ValueError):
    """A sampling parameter out of its bounds; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field


@dataclass(frozen=True)
class Sampling:
    """How one row picks its next character. Validates itself: every entry point builds one."""

    temperature: float = 1.0  # below GREEDY_BELOW (0 included): greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off

    def __post_init__(self) -> None:
        rules = (
            ("temperature", 0.0 <= self.temperature <= TEMPERATURE_MAX, f"must be in [0, {TEMPERATURE_MAX:g}]"),
            ("top_k", self.top_k >= 0, "must be at least 0 (0 = off)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
        )
        for field, ok, bounds in rules:
            if not ok:  # NaN fails every comparison, so it is refused too
                raise InvalidSampling(field, f"{bounds}, got {getattr(self, field)}")

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)

    def sample(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        """One character id from one position's logits (vocab,), with one draw from `rng`."""
        one = BatchSampler(
            np.array([self.temperature]),
            np.array([self.top_k]),
            np.array([self.top_p]),
            logits.shape[-1],
            np.array([self.min_p]),
        )
        return int(one.sample(logits.reshape(1, -1), np.array([rng.random()]))[0])


class BatchSampler:
    """Samples rows of logits, each row with its own temperature, top-k, top-p and min-p.

    One uniform draw per row picks a token by inverse CDF over the vocabulary in its own order.
    Only rows that ask for top-k, top-p or min-p are sorted, to find their cut-off, and a row's
    result depends only on its own logits, parameters and draw, never on which rows share its batch.

    What depends only on the parameters (which rows are greedy or filtered, whether any row
    scales its logits) is worked out once: a batch that keeps its rows from step to step samples
    with the same sampler, and the common all-default batch skips those operations every step.
    """

    def __init__(
        self,
        temperature: np.ndarray,
        top_k: np.ndarray,
        top_p: np.ndarray,
        vocab: int,
        min_p: np.ndarray | None = None,
    ) -> None:
        self.greedy = temperature < GREEDY_BELOW
        self.all_greedy = bool(self.greedy.all())
        self.any_greedy = bool(self.greedy.any())
        scaled = (temperature != 1.0) & ~self.greedy
        self._scale = np.where(self.greedy, 1.0, temperature)[:, None] if scaled.any() else None
        if min_p is None:
            min_p = np.zeros(len(temperature))
        filtered = (((top_k > 0) & (top_k < vocab)) | (top_p < 1.0) | (min_p > 0.0)) & ~self.greedy
        self._filtered = np.flatnonzero(filtered)
        self._top_k, self._top_p = top_k[self._filtered], top_p[self._filtered]
        self._min_p = min_p[self._filtered]

    def sample(self, logits: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        """Token ids (batch,) from logits (batch, vocab) and one uniform draw per row (ignored when greedy)."""
        best: np.ndarray | None = logits.argmax(axis=1) if self.any_greedy else None
        if best is not None and self.all_greedy:
            return best
        z = logits.astype(np.float64)
        if self._scale is not None:
            z /= self._scale
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z, out=z)  # unnormalised: the draw below scales by each row's total
        if self._filtered.size:
            rows = self._filtered
            p[rows] = _keep_top(p[rows], self._top_k, self._top_p, self._min_p)
        cdf = np.cumsum(p, axis=1)
        total = cdf[:, -1]
        # Kept below the total even when uniform * total rounds up, so some token always passes.
        target = np.minimum(uniform * total, np.nextafter(total, 0.0))
        # The first token whose CDF passes the draw; a token with probability zero never passes.
        drawn: np.ndarray = (cdf <= target[:, None]).sum(axis=1)
        return drawn if best is None else np.where(self.greedy, best, drawn)


def _keep_top(p: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray) -> np.ndarray:
    """Zero every probability below the row's cut-off: min-p, then the k most likely tokens, then the nucleus.

    min-p (vLLM's and llama.cpp's) drops tokens less likely than min_p times the most likely one,
    after temperature. The nucleus keeps a token while the mass of the tokens before it is still
    under top_p, so the most likely token is always kept. Tokens tied with the last one kept are
    kept too, as Hugging Face's top-k does.
    """
    rows, vocab = p.shape
    if min_p.any():
        p = np.where(p >= min_p[:, None] * p.max(axis=1, keepdims=True), p, 0.0)
    ranked = -np.sort(-p, axis=1)  # each row's (unnormalised) probabilities, largest first
    cum = np.cumsum(ranked, axis=1)
    before = (cum - ranked) / cum[:, -1:]
    k = np.where(top_k > 0, top_k, vocab)
    kept = ((np.arange(vocab)[None, :] < k[:, None]) & (before < top_p[:, None])).sum(axis=1)
    cutoff = ranked[np.arange(rows), kept - 1]
    out: np.ndarray = np.where(p >= cutoff[:, None], p, 0.0)
    return out

"""The one sampler: its parameters validate themselves, and one row sampled alone is that row of a batch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exports.sampling import TEMPERATURE_MAX, BatchSampler, InvalidSampling, Sampling


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": TEMPERATURE_MAX * 1.01}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": math.nan}, "min_p"),
    ],
)
def test_out_of_bounds_is_refused_naming_the_field(values: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidSampling) as refused:
        Sampling(**values)  # type: ignore[arg-type]
    assert refused.value.field == field and str(refused.value).startswith(f"{field} must be")


def test_a_denormal_temperature_is_greedy() -> None:
    logits = np.array([0.1, 3.0, -2.0, 2.9], np.float32)
    sampling = Sampling(temperature=5e-324)
    assert sampling.greedy
    assert {sampling.sample(logits, np.random.default_rng(seed)) for seed in range(20)} == {1}


def test_one_row_alone_is_that_row_of_a_batch() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 40)).astype(np.float32)
    rows = [Sampling(0.7, 5, 1.0, 0.0), Sampling(1.3, 0, 0.8, 0.05), Sampling(1.0, 0, 1.0, 0.0)]
    draws = np.array([0.11, 0.52, 0.97])
    batch = BatchSampler(
        np.array([s.temperature for s in rows]),
        np.array([s.top_k for s in rows]),
        np.array([s.top_p for s in rows]),
        40,
        np.array([s.min_p for s in rows]),
    ).sample(logits, draws)

    class Draw:  # a generator whose next draw is the one the batch row had
        def __init__(self, value: float) -> None:
            self.value = value

        def random(self) -> float:
            return self.value

    alone = [s.sample(logits[i], Draw(draws[i])) for i, s in enumerate(rows)]  # type: ignore[arg-type]
    assert alone == batch.tolist()


def test_top_k_keeps_only_the_k_likeliest() -> None:
    logits = np.array([5.0, 4.0, 3.0, -1.0, -2.0], np.float32)
    rng = np.random.default_rng(1)
    seen = {Sampling(temperature=2.0, top_k=2).sample(logits, rng) for _ in range(200)}
    assert seen == {0, 1}

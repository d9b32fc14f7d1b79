from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from service.core.draws import BLOCK, RowDraws


def scalar_draws(seed: int, n: int) -> tuple[list[float], Mapping[str, Any]]:
    """What one rng.random() per character gives, and where it leaves the RNG."""
    rng = np.random.default_rng(seed)
    values = [rng.random() for _ in range(n)]
    return values, rng.bit_generator.state


@pytest.mark.parametrize("n", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
def test_block_draws_are_the_scalar_draws_and_detach_rewinds_the_unused(n: int) -> None:
    draws = RowDraws()
    draws.grow(4)
    rngs = {slot: np.random.default_rng(10 + slot) for slot in (1, 3)}
    for slot, rng in rngs.items():
        draws.attach(slot, rng)
    got: dict[int, list[float]] = {1: [], 3: []}
    for step in range(n):
        slots = np.array([3, 1] if step % 2 else [1, 3])  # the order given is the order returned
        for slot, value in zip(slots.tolist(), draws.next(slots).tolist(), strict=True):
            got[slot].append(value)
    for slot, rng in rngs.items():
        draws.detach(slot)
        want, state = scalar_draws(10 + slot, n)
        assert got[slot] == want
        assert rng.bit_generator.state == state  # a saved session continues the same sequence


def test_a_row_that_draws_less_often_keeps_its_own_sequence() -> None:
    draws = RowDraws()
    draws.grow(2)
    busy, idle = np.random.default_rng(1), np.random.default_rng(2)
    draws.attach(0, busy)
    draws.attach(1, idle)
    for _ in range(100):
        draws.next(np.array([0]))
    assert draws.next(np.array([1, 0])).tolist() == [scalar_draws(2, 1)[0][0], scalar_draws(1, 101)[0][100]]


def test_only_a_generator_that_can_rewind_is_taken() -> None:
    draws = RowDraws()
    draws.grow(1)
    with pytest.raises(TypeError, match="PCG64"):
        draws.attach(0, np.random.Generator(np.random.MT19937(0)))

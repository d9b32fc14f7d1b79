"""Each sampling row's uniform draws, read from its job's RNG a block at a time.

A job samples with its own RNG, so that its text never depends on its neighbours. One scalar
draw per row per step is a Python call per character; reading a block of draws when the row
is taken, and a new block when it runs out, makes a step's draws one indexing operation.

The draws are the same numbers, in the same order, as one `rng.random()` per character. A row
given back rewinds its RNG over the draws it did not use, so a session's saved RNG state is
exactly where one draw per character would have left it (and its next request continues the
same sequence). Rewinding needs a bit generator that can `advance` backwards: PCG64, the one
sessions use.
"""

from __future__ import annotations

import numpy as np

BLOCK = 64  # draws read at a time: one refill per 64 characters of a stream


class RowDraws:
    def __init__(self) -> None:
        self._block = np.zeros((0, BLOCK))  # (slot, draw)
        self._used = np.zeros(0, np.intp)  # how many of each slot's block were handed out
        self._rngs: list[np.random.Generator | None] = []  # per slot: the RNG behind it, None when greedy

    def grow(self, slots: int) -> None:
        old = len(self._rngs)
        self._block = np.concatenate([self._block, np.zeros((slots - old, BLOCK))])
        self._used = np.concatenate([self._used, np.zeros(slots - old, np.intp)])
        self._rngs.extend([None] * (slots - old))

    def attach(self, slot: int, rng: np.random.Generator) -> None:
        """The slot now draws from `rng` (a sampling row; greedy rows draw nothing)."""
        if not isinstance(rng.bit_generator, np.random.PCG64):
            raise TypeError("a sampling RNG must be numpy's PCG64, which can rewind its unused draws")
        self._rngs[slot] = rng
        self._read_block(slot, rng)

    def detach(self, slot: int) -> None:
        """Give the slot's RNG back where one draw per character would have left it."""
        rng = self._rngs[slot]
        if rng is None:
            return
        self._rngs[slot] = None
        bit_generator = rng.bit_generator
        assert isinstance(bit_generator, np.random.PCG64)  # attach made sure
        bit_generator.advance(-int(BLOCK - self._used[slot]))

    def next(self, slots: np.ndarray) -> np.ndarray:
        """The next draw of each slot's RNG, (len(slots),), in the order given."""
        used = self._used[slots]
        out: np.ndarray = self._block[slots, used]
        used += 1
        self._used[slots] = used
        for slot in slots[used == BLOCK].tolist():  # a block ran out: read the next one
            rng = self._rngs[slot]
            assert rng is not None, "a greedy row has no draws"
            self._read_block(slot, rng)
        return out

    def _read_block(self, slot: int, rng: np.random.Generator) -> None:
        self._block[slot] = rng.random(BLOCK)
        self._used[slot] = 0

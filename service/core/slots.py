"""The scheduler's slot table: running jobs' state, logits and sampling parameters as array rows.

Keeping every running job's state in rows of a few arrays lets a step gather and scatter a
whole batch with one indexing operation. The table alone maps jobs to rows: taking a row
writes the job's state and parameters in, giving it back copies them out (or not).

A step may leave its batch's new state where onnxruntime wrote it (`park`) instead of
scattering it back: while the batch stays the same, the next step reads it from there. Any
other use of `state` first writes the parked rows back (`settle`), so the table always reads
as if every step had scattered.
"""

from __future__ import annotations

import numpy as np

from exports.contract import ModelInfo
from service.core.draws import RowDraws
from service.core.jobs import Job
from service.core.sampling import is_greedy

FIRST_CAPACITY = 64


class SlotTable:
    def __init__(self, info: ModelInfo) -> None:
        tensors, layers, hidden = len(info.state_names), info.num_layers, info.hidden_size
        self._state = np.zeros((tensors, layers, 0, hidden), np.float32)  # (tensor, layer, slot, hidden)
        self.logits = np.zeros((0, info.vocab_size), np.float32)  # (slot, vocab)
        self.temperature = np.zeros(0)
        self.top_k = np.zeros(0, np.int64)
        self.top_p = np.zeros(0)
        self.draws = RowDraws()  # each sampling row's uniform draws, from its job's RNG
        self._free: list[int] = []
        self._rows: dict[Job, int] = {}
        self._parked: tuple[np.ndarray, list[np.ndarray]] | None = None  # rows, and where their state is

    @property
    def state(self) -> np.ndarray:
        """Every row's state, (tensor, layer, slot, hidden), parked rows written back first."""
        self.settle()
        return self._state

    def gather(self, rows: np.ndarray, into: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """The rows' state, (layer, batch, hidden) per tensor: copied into `into` (a step's input
        buffers) or into new arrays."""
        state = self.state
        if into is None:
            return [np.take(state[k], rows, axis=1) for k in range(state.shape[0])]
        for k, buffer in enumerate(into):
            # mode="clip" (the rows are always in range) lets numpy write into `out` directly;
            # the default mode copies through a temporary buffer (36 vs 15 us at batch 64 here).
            np.take(state[k], rows, axis=1, out=buffer, mode="clip")
        return into

    def park(self, rows: np.ndarray, buffers: list[np.ndarray]) -> None:
        """The rows' newest state is in `buffers` (a step's outputs), not yet in the table."""
        self.settle()
        self._parked = (rows, buffers)

    def unpark(self, rows: np.ndarray, buffers: list[np.ndarray]) -> bool:
        """If exactly these rows, in this order, are parked in exactly these buffers, hand them over.

        True means the caller now holds the rows' state in `buffers` (to step them again, then
        `park` the result); the table no longer knows where it is until then.
        """
        parked = self._parked
        if (
            parked is None
            or not all(a is b for a, b in zip(parked[1], buffers, strict=True))
            or not (parked[0] is rows or np.array_equal(parked[0], rows))
        ):
            return False
        self._parked = None
        return True

    def settle(self) -> None:
        """Write the parked rows' state back into the table."""
        if self._parked is None:
            return
        rows, buffers = self._parked
        self._parked = None
        self.scatter(rows, buffers)

    def scatter(self, rows: np.ndarray, buffers: list[np.ndarray]) -> None:
        """Write a call's new state, (layer, batch, hidden) per tensor, into the rows."""
        for k, buffer in enumerate(buffers):
            self._state[k][:, rows] = buffer

    def row(self, job: Job) -> int:
        return self._rows[job]

    def rows(self, jobs: list[Job]) -> np.ndarray:
        rows = self._rows
        return np.fromiter((rows[j] for j in jobs), np.intp, len(jobs))

    def take(self, job: Job) -> int:
        """A row holding the job's state, logits and parameters; nothing is held if this raises."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        try:
            self.state[:, :, slot] = np.stack(job.state)
            if job.logits is not None:
                self.logits[slot] = job.logits
            self.temperature[slot] = job.params.temperature
            self.top_k[slot] = job.params.top_k
            self.top_p[slot] = job.params.top_p
            if not is_greedy(job.params.temperature):
                self.draws.attach(slot, job.rng)
        except BaseException:
            self._free.append(slot)
            raise
        self._rows[job] = slot
        return slot

    def give_back(self, job: Job, keep: bool) -> None:
        """Free the job's row, first copying its state and logits into the job when `keep`."""
        slot = self._rows.pop(job, None)
        if slot is None:
            return
        if keep:
            job.state = [self.state[k, :, slot].copy() for k in range(self.state.shape[0])]
            job.logits = self.logits[slot].copy()
        self.draws.detach(slot)
        self._free.append(slot)

    def _grow(self) -> None:
        old = self.logits.shape[0]
        new = max(FIRST_CAPACITY, 2 * old)
        current = self.state
        state = np.zeros((*current.shape[:2], new, current.shape[3]), np.float32)
        state[:, :, :old] = current
        logits = np.zeros((new, self.logits.shape[1]), np.float32)
        logits[:old] = self.logits
        self._state, self.logits = state, logits
        self.temperature = np.concatenate([self.temperature, np.zeros(new - old)])
        self.top_k = np.concatenate([self.top_k, np.zeros(new - old, np.int64)])
        self.top_p = np.concatenate([self.top_p, np.ones(new - old)])
        self.draws.grow(new)
        self._free.extend(range(new - 1, old - 1, -1))  # low rows first

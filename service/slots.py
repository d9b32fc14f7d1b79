"""The scheduler's slot table: running jobs' state, logits and sampling parameters as array rows.

Keeping every running job's state in rows of a few arrays lets a step gather and scatter a
whole batch with one indexing operation. The table alone maps jobs to rows: taking a row
writes the job's state and parameters in, giving it back copies them out (or not).
"""

from __future__ import annotations

import numpy as np

from exports.contract import ModelInfo
from service.jobs import Job

FIRST_CAPACITY = 64


class SlotTable:
    def __init__(self, info: ModelInfo) -> None:
        tensors, layers, hidden = len(info.state_names), info.num_layers, info.hidden_size
        self.state = np.zeros((tensors, layers, 0, hidden), np.float32)  # (tensor, layer, slot, hidden)
        self.logits = np.zeros((0, info.vocab_size), np.float32)  # (slot, vocab)
        self.temperature = np.zeros(0)
        self.top_k = np.zeros(0, np.int64)
        self.top_p = np.zeros(0)
        self._free: list[int] = []
        self._rows: dict[Job, int] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, job: Job) -> bool:
        return job in self._rows

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
        self._free.append(slot)

    def _grow(self) -> None:
        old = self.logits.shape[0]
        new = max(FIRST_CAPACITY, 2 * old)
        state = np.zeros((*self.state.shape[:2], new, self.state.shape[3]), np.float32)
        state[:, :, :old] = self.state
        logits = np.zeros((new, self.logits.shape[1]), np.float32)
        logits[:old] = self.logits
        self.state, self.logits = state, logits
        self.temperature = np.concatenate([self.temperature, np.zeros(new - old)])
        self.top_k = np.concatenate([self.top_k, np.zeros(new - old, np.int64)])
        self.top_p = np.concatenate([self.top_p, np.ones(new - old)])
        self._free.extend(range(new - 1, old - 1, -1))  # low rows first

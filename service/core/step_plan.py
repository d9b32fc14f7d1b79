"""What an iteration steps: which prompts read a chunk, and what a batch of sampling jobs works out once.

Chunked prefill: an iteration reads at most `prefill_chunk` prompt positions, prompts of equal
chunk length sharing one seq=T call, so a long prompt is read between decode steps instead of
stalling them (`prefill_groups`).

A `StepPlan` is a sampling batch's rows, sampler, RNG draws and what changes its logits. While
nobody joins, leaves or ends, a step's batch is the same jobs in the same order from one step to
the next (the steady state of many streams), so the scheduler keeps the plan and a step of it
does no per-job filtering or parameter lookup: only the per-row RNG draws and the events.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from service.core.constraints import CharMatcher
from service.core.jobs import Job
from service.core.sampling import BatchSampler
from service.core.slots import SlotTable


def prefill_groups(prefilling: Iterable[Job], budget: int) -> dict[int, list[Job]]:
    """The prompts that read a chunk this iteration, by chunk length, oldest first: at most `budget`
    positions in all (counting each length once, as one call reads each group), each chunk at most
    `budget` long. The oldest prompt always reads, so every prompt is read in the end."""
    groups: dict[int, list[Job]] = {}
    positions = 0
    for job in prefilling:
        n = min(budget, len(job.prompt) - job.read)
        if n not in groups:
            if positions and positions + n > budget:
                continue
            positions += n
            groups[n] = []
        groups[n].append(job)
    return groups


class StepPlan:
    def __init__(self, jobs: list[Job], rows: np.ndarray, slots: SlotTable, epoch: int) -> None:
        self.jobs = jobs
        self.rows = rows
        self.epoch = epoch  # the scheduler's count of endings when the plan was made
        self.sampler = BatchSampler(
            slots.temperature[rows],
            slots.top_k[rows],
            slots.top_p[rows],
            slots.logits.shape[1],
            np.array([j.params.min_p for j in jobs]),
        )
        drawing = np.flatnonzero(~self.sampler.greedy)  # greedy rows draw nothing from their RNG
        self._draws = slots.draws
        self._drawing_rows = rows[drawing]
        self._drawing = None if len(drawing) == len(jobs) else drawing
        self.annotated = any(j.notes is not None for j in jobs)
        self.biases = [_bias_of(i, j) for i, j in enumerate(jobs) if j.params.logit_bias]
        self.penalised = [(i, j) for i, j in enumerate(jobs) if j.seen is not None]
        # Constrained rows: their positions in the batch and their matchers, in the same order.
        self.constrained = np.array([i for i, j in enumerate(jobs) if j.matcher is not None], np.intp)
        self.matchers: list[CharMatcher] = [j.matcher for j in jobs if j.matcher is not None]
        self.adjusts = bool(self.biases or self.penalised or self.matchers)  # the logits are copied and changed
        # (constrained rows, vocab): the characters each constrained row may sample at the next step.
        self.allowed = np.stack([m.allowed for m in self.matchers]) if self.matchers else None

    def uniform(self) -> np.ndarray:
        """One draw per row from the row's own RNG (0 for greedy rows): a session's text never
        depends on its neighbours."""
        draws = self._draws.next(self._drawing_rows)
        if self._drawing is None:
            return draws
        uniform = np.zeros(len(self.jobs))
        uniform[self._drawing] = draws
        return uniform


def _bias_of(row: int, job: Job) -> tuple[int, np.ndarray, np.ndarray]:
    """(row in the batch, character ids, the bias added to each one's logit)."""
    ids, bias = zip(*job.params.logit_bias, strict=True)
    return row, np.array(ids), np.array(bias, np.float32)

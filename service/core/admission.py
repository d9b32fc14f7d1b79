"""Taking jobs in: the jobs submitted and not yet taken, and the first phase each is given.

A part of `scheduler.Scheduler`: its methods run with the scheduler's own state, and
`Scheduler.__init__` sets every attribute declared here. On the event loop, `submit` queues a
job under the lock; the step thread takes every queued job at the start of an iteration, and
`_admit` gives each a row of the slot table and its first phase.
"""

from __future__ import annotations

import time
from collections import deque

from service.core.delivery import Delivery
from service.core.jobs import Job, Phase


class Admission(Delivery):
    _joining: list[Job]  # guarded by _lock: submitted, not yet taken by the step thread
    max_rows_per_request: int | None

    def _gets_a_row(self, job: Job) -> bool:
        """Whether the job is admitted now: not when its request already runs its most jobs at once;
        it then waits for one of them to end (`_leave_group`), so one request's choices cannot fill
        every step."""
        group, cap = job.group, self.max_rows_per_request
        if group is None or cap is None:
            return True
        if self._rows_of.get(group, 0) >= cap:
            self._queued.setdefault(group, deque()).append(job)
            return False
        self._rows_of[group] = self._rows_of.get(group, 0) + 1
        return True

    def submit(self, job: Job) -> None:
        job.submitted_at = time.perf_counter()
        with self._lock:
            self._joining.append(job)
            self._lock.notify()

    def _admit(self, job: Job) -> None:
        """JOINING -> PREFILL (a prompt to read in chunks) or DECODING (nothing to read, or annotated)."""
        job.admitted_at = time.perf_counter()
        self._slots.take(job)
        if job.params.penalised:
            job.start_penalties(len(self.vocab))
        if job.prompt and job.params.steps_prompt:
            job.phase = Phase.DECODING  # reads its prompt one character per step, to annotate each
            self._running[job] = None
        elif job.prompt:
            job.phase = Phase.PREFILL
            self._prefill[job] = None
        elif job.params.max_new_chars == 0:
            self._finish(job, Phase.FED)
        elif job.logits is None:
            self._fail(job, "internal", "nothing to continue from: the session has no history and no prompt")
        else:
            job.phase = Phase.DECODING
            self._running[job] = None

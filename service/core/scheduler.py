"""Continuous batching: every session that needs its next character shares one onnxruntime step.

One scheduler per model owns a step thread. Each iteration of that thread:

  1. admits the jobs that arrived (each takes a row of the slot table) and applies cancels
     (`admission`);
  2. reads one bounded chunk of the waiting prompts (chunked prefill: at most `prefill_chunk`
     positions per iteration, prompts of equal chunk length sharing one seq=T call, as
     `step_plan.prefill_groups` picks them), so a 100,000-character prompt is read between decode
     steps instead of stalling them. While streams decode, reading takes at most `prefill_share`
     of the thread's time: after a chunk, the next waits until the decode steps since have taken
     as long as the chunk's share allows, so one request's prompts cannot cost every stream a
     chunk per character. The chunks stay the same, so the text does not depend on the load;
  3. runs one batched onnxruntime step over every decoding job (`stepping`: its last sampled
     character, or for a job that annotates its prompt, its next prompt character), writes the
     units a job steers into its state row, then samples each row's next character with its own
     parameters and RNG (a constrained row only among the characters its constraint allows, a
     penalised row from its penalised logits);
  4. turns each sampled character into text, checking constraints, stops and lengths, and hands
     the iteration's events to the event loop in one `call_soon_threadsafe` (`delivery`).

The stages are the scheduler's bases (`Admission`, `Stepping`, both on `Delivery`): one object,
one set of attributes, set here, so the step loop calls its stages as plain methods. This module
keeps the thread, its iteration, and the guards. A job's lifecycle is `jobs.Phase`. Every phase
transition runs inside a guard that fails exactly the jobs it holds, so whatever raises where,
each submitted job gets one final event (and its session lease is released by its completion
hook). Steps never wait for the event loop: while it sends step t's characters the thread
already runs step t+1 (onnxruntime releases the GIL).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from service.core.admission import Admission
from service.core.constraints import ConstraintCompiler
from service.core.engine import Engine
from service.core.events import ErrorEvent
from service.core.jobs import Job
from service.core.slots import SlotTable
from service.core.step_plan import prefill_groups
from service.core.stepping import RuntimeCallFailed, Stepping
from service.metrics import Metrics
from service.settings import PREFILL_CHUNK, PREFILL_SHARE

log = logging.getLogger("charstream.scheduler")


class Scheduler(Admission, Stepping):
    def __init__(
        self,
        name: str,
        engine: Engine,
        metrics: Metrics,
        max_batch_size: int = 256,
        max_wait_us: int = 0,
        batching: bool = True,
        prefill_chunk: int = PREFILL_CHUNK,
        prefill_share: float = PREFILL_SHARE,
        clock: Callable[[], float] = time.perf_counter,
        max_rows_per_request: int | None = None,
    ) -> None:
        self.name = name
        self.engine = engine
        self.max_batch_size = max_batch_size if batching else 1
        self.max_wait_s = max_wait_us / 1e6
        self.prefill_chunk = prefill_chunk
        self._decode_per_read = (1 - prefill_share) / prefill_share  # decode seconds owed per second read
        self._owed_s = 0.0  # decode time to run before the next chunk, while streams decode
        self._clock = clock  # what the share is measured with
        self.max_rows_per_request = max_rows_per_request
        self._rows_of: dict[object, int] = {}
        self._queued: dict[object, deque[Job]] = {}
        self.vocab = engine.info.vocab
        self.constraints = ConstraintCompiler(self.vocab)  # this model's compiled constraints, cached
        self._lock = threading.Condition()
        # Guarded by _lock: what the event loop hands the step thread.
        self._joining: list[Job] = []
        self._cancels: list[Job] = []
        self._abort: ErrorEvent | None = None
        self._stopping = False
        # Owned by the step thread. Dicts keep arrival order, which is the batch order.
        self._intake: list[Job] = []
        self._prefill: dict[Job, None] = {}  # Phase.PREFILL
        self._running: dict[Job, None] = {}  # Phase.DECODING and Phase.FINISHING
        self._slots = SlotTable(engine.info)
        self._steady = None
        self._endings = 0
        self._outbox = []
        self._emitted = 0
        self._thread: threading.Thread | None = None
        self._loop = None
        self._generated_chars = metrics.generated_chars.labels(name)
        self._step_metrics = metrics.calls(name, "step")
        self.request_metrics = metrics.requests_of(name)
        # Read at scrape time, without the thread's cooperation (approximate, as `active`).
        metrics.running.labels(name).set_function(lambda: len(self._prefill) + len(self._running))
        metrics.waiting.labels(name).set_function(lambda: len(self._joining) + len(self._intake) + self._waiting_rows)
        self._prime_metrics = metrics.calls(name, "prime")
        self._errors = metrics.errors  # by the code the client sees: engine_error, invalid_input, internal...

    # -- public API (event loop) -------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run_forever, name=f"step-{self.name}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """End the step thread; every job still held gets a `shutting_down` error."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        # The thread is gone: what it left is failed here, on the loop, and delivered at once.
        self._fail_held("shutting_down", "the server is shutting down")
        batch, self._outbox = self._outbox, []
        self._deliver(batch)

    def abort_all(self, code: str, message: str) -> None:
        """End every job this scheduler holds with an error (a drain that ran out of time)."""
        with self._lock:
            self._abort = ErrorEvent(code, message)
            self._lock.notify()

    @property
    def active(self) -> int:
        """Jobs submitted and not yet finished (read without the thread's cooperation: approximate)."""
        return len(self._joining) + len(self._intake) + self._waiting_rows + len(self._prefill) + len(self._running)

    @property
    def _waiting_rows(self) -> int:
        """Jobs waiting for one of their request's jobs to end (approximate from another thread)."""
        return sum(len(q) for q in list(self._queued.values()))

    # -- the step thread ---------------------------------------------------------------------------

    def _run_forever(self) -> None:
        try:
            while self._next_iteration():
                pass
        finally:
            if not self._stopping:  # the thread died of something no guard caught: nobody is left hanging
                self._fail_held("internal", "the scheduler stopped")
                self._flush()

    def _next_iteration(self) -> bool:
        with self._lock:
            while not (self._stopping or self._joining or self._cancels or self._abort or self._busy):
                self._lock.wait()
            if self._stopping:
                return False
            idle_wake = not self._busy
        if idle_wake and self.max_wait_s:
            time.sleep(self.max_wait_s)  # arrivals often come together: let them share the first step
        with self._lock:
            self._intake.extend(self._joining)
            self._joining.clear()
            cancels, self._cancels = self._cancels, []
            abort, self._abort = self._abort, None
        try:
            if abort is not None:
                self._fail_held(abort.code, abort.message)
            else:
                self._iterate(cancels)
        except Exception:  # a bug outside every guard: fail what is held, keep serving
            log.exception("scheduler iteration failed", extra={"model": self.name})
            self._fail_held("internal", "the generation failed on the server")
        self._flush()
        return True

    @property
    def _busy(self) -> bool:
        return bool(self._prefill or self._running or self._intake)

    def _iterate(self, cancels: list[Job]) -> None:
        for job in self._intake:  # (a job ending while they are taken in may add a waiting one)
            if self._gets_a_row(job):
                self._guarded([job], "admit", self._admit, job)
        self._intake.clear()
        for job in cancels:
            self._guarded([job], "cancel", self._cancel_now, job)
        if self._prefill and (not self._running or self._owed_s <= 0):
            t0 = self._clock()
            self._prefill_some()
            self._owed_s = (self._clock() - t0) * self._decode_per_read
        if self._running:
            t0 = self._clock()
            jobs = list(self._running)
            for start in range(0, len(jobs), self.max_batch_size):
                batch = jobs[start : start + self.max_batch_size]
                self._guarded(batch, "step", self._step, batch)
            self._owed_s -= self._clock() - t0
        if not self._running:
            self._steady = None  # idle: hold no finished jobs

    def _guarded(self, jobs: list[Job], what: str, work: Callable[..., None], *args: Any) -> None:
        """Run one stage for `jobs`; if it raises, exactly those jobs fail and the rest go on."""
        try:
            work(*args)
        except RuntimeCallFailed as exc:
            log.error("engine call failed", extra={"model": self.name, "batch": len(jobs), "stage": what})
            for job in jobs:
                self._fail(job, "engine_error", str(exc))
        except Exception:
            log.exception("scheduler stage failed", extra={"model": self.name, "batch": len(jobs), "stage": what})
            for job in jobs:
                self._fail(job, "internal", "the generation failed on the server")

    def _fail_held(self, code: str, message: str) -> None:
        with self._lock:
            joining, self._joining = self._joining, []
        queued = [job for waiting in self._queued.values() for job in waiting]
        for job in [*joining, *self._intake, *queued, *self._prefill, *self._running]:
            self._fail(job, code, message)
        self._intake.clear()
        self._queued.clear()

    def _prefill_some(self) -> None:
        """Read one chunk of the waiting prompts (`step_plan.prefill_groups`), a call per chunk length."""
        for n, group in prefill_groups(self._prefill, self.prefill_chunk).items():
            for start in range(0, len(group), self.max_batch_size):
                batch = group[start : start + self.max_batch_size]
                self._guarded(batch, "prefill", self._prefill_batch, batch, n)
                for job in batch:  # the next iteration serves the prompts that waited
                    if job in self._prefill:
                        del self._prefill[job]
                        self._prefill[job] = None

"""Continuous batching: every session that needs its next character shares one onnxruntime step.

One scheduler per model owns a step thread. Each iteration of that thread:

  1. jobs that just arrived read their prompt (one seq=T call per group of equal length) and
     take a slot in the scheduler's state arrays;
  2. one batched onnxruntime call reads every active job's last sampled character (the rows'
     state is gathered into pre-bound IOBinding buffers and scattered back), then each row
     samples its next character with its own parameters and RNG, and stop sequences and
     lengths are checked;
  3. the resulting text and completion events are handed to the event loop in one
     `call_soon_threadsafe`, which puts them in each job's mailbox, and the next step starts.

Steps never wait for the event loop: while it sends step t's characters, the thread already
runs step t+1 (onnxruntime releases the GIL). A stream whose client reads slowly gets several
characters in one frame. Jobs join and leave between steps, so a long generation never holds
up a short one, and a cancelled job leaves at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np

from service.engine import Engine
from service.metrics import Metrics
from service.sampling import SamplingParams, StopMatcher, log_softmax_at, sample_rows

log = logging.getLogger("charstream.scheduler")

# A prompt longer than this is read in several calls, so one huge prompt cannot stall the batch.
PRIME_CHUNK = 4096


@dataclass(slots=True)
class TextEvent:
    text: str
    logprobs: list[float] | None = None


@dataclass(slots=True)
class DoneEvent:
    finish_reason: str  # length | stop | cancelled | fed
    generated_chars: int


@dataclass(slots=True)
class ErrorEvent:
    code: str
    message: str


Event = TextEvent | DoneEvent | ErrorEvent


class Mailbox:
    """A job's events on their way to its stream, taken all at once on the event loop.

    Lighter than an asyncio.Queue per character: a put is a list append plus, only when the
    stream is waiting, one future to wake, and a stream that fell behind by several steps takes
    all of them in one go (and sends them as one frame).
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Event] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, event: Event) -> None:
        self._items.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self) -> list[Event]:
        """Every event waiting, in order; waits for at least one."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


@dataclass(eq=False)
class Job:
    """One generation (or feed) on one session's state, owned by the scheduler until it completes."""

    prime: list[int]
    state: list[np.ndarray]  # (layers, hidden) per state tensor
    logits: np.ndarray | None  # (vocab,) next-char logits, None until the model has read something
    params: SamplingParams
    rng: np.random.Generator
    keep_state: bool = True  # False for stateless requests: skip reading the final character
    on_complete: Callable[[Job], None] | None = None
    events: Mailbox = field(default_factory=Mailbox)
    generated: int = 0
    absorbed: int = 0  # characters the state has read during this job
    pending: int | None = None  # sampled and sent, not yet read by the model
    pending_logprob: float | None = None
    fresh: bool = False  # `pending` was sampled in the last step and is not sent yet
    slot: int = -1  # row in the scheduler's state arrays while active
    finish_reason: str | None = None
    cancelled: bool = False
    failed: bool = False
    completed: bool = False
    stop: StopMatcher = field(init=False)
    held_logprobs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stop = StopMatcher(self.params.stop)

    @property
    def wants_char(self) -> bool:
        return self.finish_reason is None and not self.cancelled

    @property
    def done(self) -> bool:
        return (self.finish_reason is not None or self.cancelled) and (self.pending is None or not self.keep_state)


class Scheduler:
    def __init__(
        self,
        name: str,
        engine: Engine,
        metrics: Metrics,
        max_batch_size: int = 256,
        max_wait_us: int = 0,
        batching: bool = True,
    ) -> None:
        self.name = name
        self.engine = engine
        self.max_batch_size = max_batch_size if batching else 1
        self.max_wait_s = max_wait_us / 1e6
        self.vocab = engine.info.vocab
        self._lock = threading.Condition()
        self._joining: list[Job] = []  # guarded by _lock
        self._stopping = False
        # Owned by the step thread. Insertion-ordered: the batch order is arrival order.
        self._active: dict[Job, None] = {}
        # Active jobs' state, next-char logits and sampling parameters live in rows ("slots") of
        # these arrays, so a step gathers and scatters a whole batch with one indexing operation.
        info = engine.info
        self._state = np.zeros((len(info.state_names), info.num_layers, 0, info.hidden_size), np.float32)
        self._logits = np.zeros((0, info.vocab_size), np.float32)
        self._temperature = np.zeros(0)
        self._top_k = np.zeros(0, np.int64)
        self._top_p = np.zeros(0)
        self._free: list[int] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list[tuple[Job, Event | None]] = []  # step thread only; None = complete
        self._emitted = 0  # characters handed out since the last flush (step thread only)
        self._generated_chars = metrics.generated_chars.labels(name)
        self._step_metrics = metrics.calls(name, "step")
        self._prime_metrics = metrics.calls(name, "prime")

    # -- public API (event loop) -------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run_forever, name=f"step-{self.name}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        # The thread is gone: whatever it left is failed here, on the loop.
        for job in [*self._joining, *self._active]:
            self._fail(job, "shutting_down", "the server is shutting down")
        self._flush()
        self._joining.clear()
        self._active.clear()

    def submit(self, job: Job) -> None:
        with self._lock:
            self._joining.append(job)
            self._lock.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job: it leaves the batch at the next step boundary."""
        if not job.completed:
            job.cancelled = True
            with self._lock:
                self._lock.notify()

    @property
    def active(self) -> int:
        return len(self._active) + len(self._joining)

    # -- the step thread ---------------------------------------------------------------------------

    def _run_forever(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._joining and not self._active:
                    self._lock.wait()
                if self._stopping:
                    return
                idle_wake = not self._active
            if idle_wake and self.max_wait_s:
                time.sleep(self.max_wait_s)  # arrivals often come together: let them share the first step
            with self._lock:
                joining, self._joining = self._joining, []
            try:
                if joining:
                    self._admit(joining)
                if self._active:
                    self._step()
            except Exception:  # a bug here must not end the thread for every other session
                log.exception("scheduler step failed", extra={"model": self.name})
                for job in list(self._active):
                    self._fail(job, "internal", "the generation failed on the server")
            self._flush()

    def _flush(self) -> None:
        """Hand this step's events to the event loop in one call."""
        if self._emitted:
            self._generated_chars.inc(self._emitted)
            self._emitted = 0
        if not self._outbox or self._loop is None:
            return
        batch, self._outbox = self._outbox, []
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to receive
            self._loop.call_soon_threadsafe(_deliver, batch)

    def _admit(self, joining: list[Job]) -> None:
        ready = []
        for job in joining:
            if job.cancelled:
                self._complete(job)
            elif job.prime:
                ready.append(job)
            else:
                self._activate(job)
        ready.sort(key=lambda j: len(j.prime))
        for _, group in groupby(ready, key=lambda j: len(j.prime)):
            self._in_batches(list(group), self._prime, self._activate, "read the prompt")

    def _in_batches(
        self, jobs: list[Job], work: Callable[[list[Job]], None], then: Callable[[Job], None], what: str
    ) -> None:
        """`work` on batches of at most max_batch_size; a failure fails only its own batch's jobs."""
        for start in range(0, len(jobs), self.max_batch_size):
            batch = [j for j in jobs[start : start + self.max_batch_size] if not j.completed]
            if not batch:
                continue
            try:
                work(batch)
            except Exception as exc:
                log.exception("engine call failed", extra={"model": self.name, "batch": len(batch), "what": what})
                for job in batch:
                    self._fail(job, "engine_error", f"the model failed to {what}: {exc}")
                continue
            for job in batch:
                then(job)

    def _activate(self, job: Job) -> None:
        if job.cancelled:
            self._complete(job)
        elif job.params.max_new_chars == 0:
            job.finish_reason = "fed"
            self._complete(job)
        elif job.logits is None:
            self._fail(job, "internal", "nothing to continue from: the session has no history and no prompt")
        else:
            self._take_slot(job)
            self._active[job] = None

    def _take_slot(self, job: Job) -> None:
        if not self._free:
            old = self._logits.shape[0]
            new = max(64, 2 * old)
            state = np.zeros((*self._state.shape[:2], new, self._state.shape[3]), np.float32)
            state[:, :, :old] = self._state
            logits = np.zeros((new, self._logits.shape[1]), np.float32)
            logits[:old] = self._logits
            self._state, self._logits = state, logits
            self._temperature = np.concatenate([self._temperature, np.zeros(new - old)])
            self._top_k = np.concatenate([self._top_k, np.zeros(new - old, np.int64)])
            self._top_p = np.concatenate([self._top_p, np.ones(new - old)])
            self._free.extend(range(new - 1, old - 1, -1))  # low slots first
        slot = self._free.pop()
        self._state[:, :, slot] = np.stack(job.state)
        assert job.logits is not None
        self._logits[slot] = job.logits
        self._temperature[slot] = job.params.temperature
        self._top_k[slot] = job.params.top_k
        self._top_p[slot] = job.params.top_p
        job.slot = slot

    def _give_back_slot(self, job: Job, keep: bool) -> None:
        """Copy the job's state out of its slot (when `keep`) and free the slot."""
        if job.slot < 0:
            return
        if keep:
            job.state = [self._state[k, :, job.slot].copy() for k in range(self._state.shape[0])]
            job.logits = self._logits[job.slot].copy()
        self._free.append(job.slot)
        job.slot = -1

    def _step(self) -> None:
        for job in [j for j in self._active if j.cancelled or j.done]:
            if job.cancelled and job.fresh:
                self._drop_unsent(job)
            if job.done:
                self._complete(job)
        self._in_batches(list(self._active), self._compute, self._dispatch, "run a step")

    def _prime(self, jobs: list[Job]) -> None:
        """Read each job's prompt (all of one length) in seq=T calls, before it takes a slot."""
        prompt = np.asarray([j.prime for j in jobs], dtype=np.int64)
        state = [np.stack([j.state[k] for j in jobs], axis=1) for k in range(len(jobs[0].state))]
        last = None
        for start in range(0, prompt.shape[1], PRIME_CHUNK):
            tokens = np.ascontiguousarray(prompt[:, start : start + PRIME_CHUNK])
            t0 = time.perf_counter()
            logits, state = self.engine.run(tokens, state)
            self._prime_metrics.observe(time.perf_counter() - t0, len(jobs))
            last = logits[:, -1, :]
        assert last is not None
        for i, job in enumerate(jobs):
            job.state = [np.ascontiguousarray(s[:, i, :]) for s in state]
            job.logits = last[i].copy()
            job.absorbed += prompt.shape[1]
            job.prime = []

    def _compute(self, jobs: list[Job]) -> None:
        """Read each job's pending character, then sample the next one for jobs that want it."""
        reading = [j for j in jobs if j.pending is not None and (j.keep_state or j.wants_char)]
        if reading:
            idx = np.fromiter((j.slot for j in reading), np.intp, len(reading))
            bound = self.engine.binding(len(reading))
            bound.tokens[:, 0] = np.fromiter((j.pending or 0 for j in reading), np.int64, len(reading))
            for k, buffer in enumerate(bound.state_in):  # gather the rows straight into the bound inputs
                # mode="clip" (the slots are always in range) lets numpy write into `out` directly;
                # the default mode copies through a temporary buffer (36 vs 15 us at batch 64 here).
                np.take(self._state[k], idx, axis=1, out=buffer, mode="clip")
            t0 = time.perf_counter()
            bound.run()
            self._step_metrics.observe(time.perf_counter() - t0, len(reading))
            for k, buffer in enumerate(bound.state_out):
                self._state[k][:, idx] = buffer
            self._logits[idx] = bound.logits[:, 0]
            for job in reading:
                job.pending = None
                job.absorbed += 1
        sampling = [j for j in jobs if j.wants_char and j.pending is None]
        if not sampling:
            return
        idx = np.fromiter((j.slot for j in sampling), np.intp, len(sampling))
        logits = self._logits[idx]
        # One draw per row from the row's own RNG: a session's text never depends on its neighbours.
        uniform = np.array([j.rng.random() if j.params.temperature > 0 else 0.0 for j in sampling])
        ids = sample_rows(logits, self._temperature[idx], self._top_k[idx], self._top_p[idx], uniform)
        lps = log_softmax_at(logits, ids) if any(j.params.logprobs for j in sampling) else None
        for i, job in enumerate(sampling):
            job.fresh = True
            job.pending = int(ids[i])
            job.pending_logprob = None if lps is None else float(lps[i])

    def _drop_unsent(self, job: Job) -> None:
        # Sampled after the cancel: the client never sees it, so the state never reads it.
        job.fresh = False
        job.pending = None

    def _dispatch(self, job: Job) -> None:
        if job.completed:
            return
        if job.fresh:
            if job.cancelled:
                self._drop_unsent(job)
            else:
                job.fresh = False
                self._emit(job)
        if job.done:
            self._complete(job)

    def _emit(self, job: Job) -> None:
        assert job.pending is not None
        job.generated += 1
        if job.params.logprobs and job.pending_logprob is not None:
            job.held_logprobs.append(job.pending_logprob)
        text, stopped = job.stop.push(self.vocab[job.pending])
        if stopped:
            job.finish_reason = "stop"
        elif job.generated >= job.params.max_new_chars:
            text += job.stop.flush()
            job.finish_reason = "length"
        self._emitted += 1
        if text:
            logprobs = None
            if job.params.logprobs:
                logprobs = job.held_logprobs[: len(text)]
                del job.held_logprobs[: len(text)]
            self._outbox.append((job, TextEvent(text, logprobs)))

    def _complete(self, job: Job) -> None:
        if job.completed:
            return
        job.completed = True
        self._active.pop(job, None)
        self._give_back_slot(job, keep=True)
        self._outbox.append((job, DoneEvent(job.finish_reason or "cancelled", job.generated)))

    def _fail(self, job: Job, code: str, message: str) -> None:
        if job.completed:
            return
        job.completed = True
        job.failed = True
        self._active.pop(job, None)
        self._give_back_slot(job, keep=False)
        self._outbox.append((job, ErrorEvent(code, message)))


def _deliver(batch: list[tuple[Job, Event | None]]) -> None:
    """On the event loop: queue each event for its stream; a final event also completes the job."""
    for job, event in batch:
        if event is not None:
            job.events.put(event)
        if isinstance(event, (DoneEvent, ErrorEvent)) and job.on_complete is not None:
            job.on_complete(job)

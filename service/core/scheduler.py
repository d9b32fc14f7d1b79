"""Continuous batching: every session that needs its next character shares one onnxruntime step.

One scheduler per model owns a step thread. Each iteration of that thread:

  1. admits the jobs that arrived (each takes a row of the slot table) and applies cancels;
  2. reads one bounded chunk of the waiting prompts (chunked prefill: at most `prefill_chunk`
     positions per iteration, prompts of equal chunk length sharing one seq=T call), so a
     100,000-character prompt is read between decode steps instead of stalling them;
  3. runs one batched onnxruntime step over every decoding job (its last sampled character,
     or for a job that annotates its prompt, its next prompt character), writes the units a job
     steers into its state row, then samples each row's next character with its own parameters
     and RNG (a constrained row only among the characters its constraint allows, a penalised row
     from its penalised logits) and checks constraints, stops and lengths;
  4. hands the step's events to the event loop in one `call_soon_threadsafe`.

A job's lifecycle is `jobs.Phase`. Every phase transition runs inside a guard that fails
exactly the jobs it holds, so whatever raises where, each submitted job gets one final event
(and its session lease is released by its completion hook). Steps never wait for the event
loop: while it sends step t's characters the thread already runs step t+1 (onnxruntime
releases the GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from service.core.constraints import ConstraintCompiler, advance_all
from service.core.engine import Engine
from service.core.events import FINAL_EVENTS, DoneEvent, ErrorEvent, Event, TextEvent, TopLogprobs
from service.core.jobs import Job, Phase
from service.core.sampling import log_softmax, penalise, top_alternatives
from service.core.slots import SlotTable
from service.core.step_plan import StepPlan
from service.metrics import Metrics
from service.settings import PREFILL_CHUNK

log = logging.getLogger("charstream.scheduler")

ACTIVATION_DECIMALS = 4  # unit values are sent rounded to this many decimals


class RuntimeCallFailed(Exception):
    """onnxruntime raised: the model failed, not the scheduler (the client sees errors.EngineFailed)."""


class Scheduler:
    def __init__(
        self,
        name: str,
        engine: Engine,
        metrics: Metrics,
        max_batch_size: int = 256,
        max_wait_us: int = 0,
        batching: bool = True,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        self.name = name
        self.engine = engine
        self.max_batch_size = max_batch_size if batching else 1
        self.max_wait_s = max_wait_us / 1e6
        self.prefill_chunk = prefill_chunk
        self.vocab = engine.info.vocab
        self.constraints = ConstraintCompiler(self.vocab)  # this model's compiled constraints, cached
        self._lock = threading.Condition()
        # Guarded by _lock: what the event loop hands the step thread.
        self._joining: list[Job] = []
        self._cancels: list[Job] = []
        self._abort: ErrorEvent | None = None
        self._stopping = False
        # Owned by the step thread. Dicts keep arrival order, which is the batch order.
        self._intake: list[Job] = []  # taken from _joining, being admitted
        self._prefill: dict[Job, None] = {}  # Phase.PREFILL
        self._running: dict[Job, None] = {}  # Phase.DECODING and Phase.FINISHING
        self._slots = SlotTable(engine.info)
        # The last step's sampling plan, reused while the batch stays the same: the same jobs and
        # no job ended since (`_endings` counts them; an ending job stays one step, FINISHING).
        self._steady: StepPlan | None = None
        self._endings = 0
        self._outbox: list[tuple[Job, Event]] = []
        self._emitted = 0  # characters handed out since the last flush
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generated_chars = metrics.generated_chars.labels(name)
        self._step_metrics = metrics.calls(name, "step")
        self.request_metrics = metrics.requests_of(name)
        # Read at scrape time, without the thread's cooperation (approximate, as `active`).
        metrics.running.labels(name).set_function(lambda: len(self._prefill) + len(self._running))
        metrics.waiting.labels(name).set_function(lambda: len(self._joining) + len(self._intake))
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

    def submit(self, job: Job) -> None:
        job.submitted_at = time.perf_counter()
        with self._lock:
            self._joining.append(job)
            self._lock.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job: it leaves at the next step boundary, after reading what it already sent."""
        if not job.phase.finished:
            with self._lock:
                self._cancels.append(job)
                self._lock.notify()

    def abort_all(self, code: str, message: str) -> None:
        """End every job this scheduler holds with an error (a drain that ran out of time)."""
        with self._lock:
            self._abort = ErrorEvent(code, message)
            self._lock.notify()

    @property
    def active(self) -> int:
        """Jobs submitted and not yet finished (read without the thread's cooperation: approximate)."""
        return len(self._joining) + len(self._intake) + len(self._prefill) + len(self._running)

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
        for job in self._intake:
            self._guarded([job], "admit", self._admit, job)
        self._intake.clear()
        for job in cancels:
            self._guarded([job], "cancel", self._cancel_now, job)
        if self._prefill:
            self._prefill_some()
        if self._running:
            jobs = list(self._running)
            for start in range(0, len(jobs), self.max_batch_size):
                batch = jobs[start : start + self.max_batch_size]
                self._guarded(batch, "step", self._step, batch)
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
        for job in [*joining, *self._intake, *self._prefill, *self._running]:
            self._fail(job, code, message)
        self._intake.clear()

    # -- phases ------------------------------------------------------------------------------------

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

    def _prompt_read(self, job: Job) -> None:
        """PREFILL -> DECODING, or FED for a job that only reads."""
        self._prefill.pop(job, None)
        if job.notes is not None and (job.params.prompt_logprobs or job.params.prompt_ranks):
            self._outbox.append((job, job.notes.prompt_event("".join(self.vocab[c] for c in job.prompt))))
        if job.params.max_new_chars == 0:
            self._finish(job, Phase.FED)
        else:
            job.phase = Phase.DECODING
            self._running[job] = None

    def _cancel_now(self, job: Job) -> None:
        if job.phase in (Phase.PREFILL, Phase.DECODING) and job.read < len(job.prompt):
            # Part of a prompt read: the state keeps none of it, as if the request had not come.
            job.absorbed = 0
            self._finish(job, Phase.CANCELLED, keep=False)
        elif job.phase is Phase.DECODING:
            self._release_text(job, job.stop.flush())  # what the state read, the client sees
            self._end_decoding(job, Phase.CANCELLED)

    def _end_decoding(self, job: Job, ending: Phase) -> None:
        """DECODING -> FINISHING (the last character sent still has to be read) or finished."""
        self._endings += 1
        if job.next_input is not None and job.reads_last_char:
            job.phase, job.ending = Phase.FINISHING, ending
        else:
            job.next_input = None
            self._finish(job, ending)

    def _finish(self, job: Job, phase: Phase, keep: bool = True) -> None:
        """Any phase -> a finished one: free the job's row (copying its state out) and say so."""
        if job.phase.finished:
            return
        self._prefill.pop(job, None)
        self._running.pop(job, None)
        self._slots.give_back(job, keep=keep and job.wants_state)
        job.phase = phase
        if job.notes is not None:
            self._send_notes(job)
        self._outbox.append((job, DoneEvent(phase.finish_reason, job.generated)))

    def _fail(self, job: Job, code: str, message: str, field: str | None = None) -> None:
        if job.phase.finished:
            return
        self._prefill.pop(job, None)
        self._running.pop(job, None)
        self._slots.give_back(job, keep=False)
        job.phase = Phase.FAILED
        self._errors.labels(code).inc()
        self._outbox.append((job, ErrorEvent(code, message, field)))

    # -- engine work -------------------------------------------------------------------------------

    def _prefill_some(self) -> None:
        """Read at most `prefill_chunk` positions of the waiting prompts, oldest first."""
        groups: dict[int, list[Job]] = {}
        positions = 0
        for job in self._prefill:
            n = min(self.prefill_chunk, len(job.prompt) - job.read)
            if n not in groups:
                if positions and positions + n > self.prefill_chunk:
                    continue
                positions += n
                groups[n] = []
            groups[n].append(job)
        for n, group in groups.items():
            for start in range(0, len(group), self.max_batch_size):
                batch = group[start : start + self.max_batch_size]
                self._guarded(batch, "prefill", self._prefill_batch, batch, n)
                for job in batch:  # the next iteration serves the prompts that waited
                    if job in self._prefill:
                        del self._prefill[job]
                        self._prefill[job] = None

    def _prefill_batch(self, jobs: list[Job], n: int) -> None:
        slots = self._slots
        rows = slots.rows(jobs)
        tokens = np.array([j.prompt[j.read : j.read + n] for j in jobs], np.int64)
        state = slots.gather(rows)
        scoring = [b for b, j in enumerate(jobs) if j.params.prompt_logprobs or j.params.prompt_ranks]
        before = slots.logits[rows[scoring]] if scoring else None  # what predicted each chunk's first character
        t0 = time.perf_counter()
        try:
            logits, state = self.engine.run(tokens, state)
        except Exception as exc:
            raise RuntimeCallFailed(f"the model failed to read the prompt: {exc}") from exc
        if before is not None:
            for b, first in zip(scoring, before, strict=True):
                self._note_prompt_chunk(jobs[b], first, logits[b], n)
        self._prime_metrics.observe(time.perf_counter() - t0, len(jobs))
        slots.scatter(rows, state)
        slots.logits[rows] = logits[:, -1]
        for i, job in enumerate(jobs):
            job.read += n
            job.absorbed += n
            if job.on_chunk is not None:  # the prompt-state cache keeps the state at chunk boundaries
                job.on_chunk(job.read, [s[:, i] for s in state], logits[i, -1])
            if job.read == len(job.prompt):
                self._prompt_read(job)

    def _step(self, jobs: list[Job]) -> None:
        """One character for each job: read its input, then sample the next for jobs that want one."""
        steady = self._steady
        if steady is not None and steady.jobs == jobs and steady.epoch == self._endings:
            # The jobs that sampled at the last step, none of them ended: each reads what it
            # sampled and samples again, with the rows, sampler and draws worked out then.
            self._read(jobs, steady.rows, [])
            self._sample(steady)
            return
        self._steady = None
        for job in jobs:
            if job.next_input is None and job.read < len(job.prompt):
                job.next_input = job.prompt[job.read]
        reading = [j for j in jobs if j.next_input is not None]
        if reading:
            forced = [i for i, j in enumerate(reading) if j.read < len(j.prompt)]
            self._read(reading, self._slots.rows(reading), forced)
        for job in jobs:
            if job.phase is Phase.FINISHING:
                self._finish(job, job.ending)
            elif job.phase is Phase.DECODING and job.params.max_new_chars == 0 and job.read == len(job.prompt):
                self._finish(job, Phase.FED)
        sampling = [j for j in jobs if j.phase is Phase.DECODING and j.read == len(j.prompt)]
        if sampling:
            plan = StepPlan(sampling, self._slots.rows(sampling), self._slots, self._endings)
            self._sample(plan)
            self._steady = plan  # stale at once if a job ended in it

    def _read(self, jobs: list[Job], rows: np.ndarray, forced: list[int]) -> None:
        """Step each job over its `next_input`; `forced` are the indices of those reading a prompt
        character (to annotate it)."""
        slots = self._slots
        if forced:
            self._note_prompt_logprobs([jobs[i] for i in forced], rows[forced])
        bound = self.engine.binding(len(jobs))
        bound.tokens[:, 0] = np.fromiter((j.next_input or 0 for j in jobs), np.int64, len(jobs))
        if slots.unpark(rows, bound.state_out):  # the same batch as the last step: its state is where it left it
            bound.carry()
        else:
            slots.gather(rows, bound.state_in)
        t0 = time.perf_counter()
        try:
            bound.run()
        except Exception as exc:
            raise RuntimeCallFailed(f"the model failed to run a step: {exc}") from exc
        self._step_metrics.observe(time.perf_counter() - t0, len(jobs))
        state = bound.state_out
        slots.park(rows, state)
        slots.logits[rows] = bound.logits[:, 0]
        for i, job in enumerate(jobs):
            job.next_input = None
            job.absorbed += 1
            if job.params.steer:
                _steer(state, i, job)
            if job.notes is not None and job.params.activations is not None:
                spec = job.params.activations
                # Four decimals: plenty to colour text by, and a third of the JSON to write and send.
                values = state[spec.tensor][spec.layer, i, list(spec.units)].round(ACTIVATION_DECIMALS).tolist()
                if job.read < len(job.prompt):
                    job.notes.prompt_activations.append(values)
                else:
                    job.notes.activations.append(values)
                    self._send_notes(job)
        for i in forced:
            job = jobs[i]
            job.read += 1
            if job.read == len(job.prompt) and job.notes is not None:
                self._outbox.append((job, job.notes.prompt_event("".join(self.vocab[c] for c in job.prompt))))

    def _note_prompt_chunk(self, job: Job, first: np.ndarray, logits: np.ndarray, n: int) -> None:
        """A chunk of a prompt read teacher-forced: how likely the model found each of its n characters.

        `first` (vocab,) predicted the chunk's first character, `logits` (n, vocab) the rest: one
        log-softmax over the chunk, as scoring a text needs (no per-character step)."""
        notes, params = job.notes, job.params
        assert notes is not None
        ids = job.prompt[job.read : job.read + n]
        lps = log_softmax(np.concatenate([first[None], logits[: n - 1]]))  # (n, vocab)
        chosen = lps[np.arange(n), ids]
        unpredicted = job.read == 0 and job.logits is None  # nothing read before the first character
        if params.prompt_logprobs:
            values: list[float | None] = list(chosen.tolist())
            tops: list[TopLogprobs | None] = []
            if params.top_logprobs:
                tops = list(top_alternatives(lps, params.top_logprobs, self.vocab))
            if unpredicted:
                values[0] = None
                tops[:1] = [None] if tops else []
            notes.prompt_logprobs.extend(values)
            notes.prompt_top.extend(tops)
        if params.prompt_ranks:
            ranks: list[int | None] = list((lps > chosen[:, None]).sum(axis=1).tolist())
            if unpredicted:
                ranks[0] = None
            notes.prompt_ranks.extend(ranks)

    def _note_prompt_logprobs(self, jobs: list[Job], rows: np.ndarray) -> None:
        """Before reading a prompt character: how likely the model found it (OpenAI's echo logprobs)."""
        for job, row in zip(jobs, rows, strict=True):
            notes = job.notes
            if notes is None or not job.params.prompt_logprobs:
                continue
            if job.read == 0 and job.logits is None:  # nothing read before the first character
                notes.prompt_logprobs.append(None)
                notes.prompt_top.append(None)
                continue
            lps = log_softmax(self._slots.logits[row : row + 1])
            notes.prompt_logprobs.append(float(lps[0, job.prompt[job.read]]))
            if job.params.top_logprobs:
                notes.prompt_top.append(top_alternatives(lps, job.params.top_logprobs, self.vocab)[0])

    def _sample(self, plan: StepPlan) -> None:
        logits = self._slots.logits[plan.rows]
        lps = log_softmax(logits) if plan.annotated else None  # the model's own
        drawn_from = logits
        if plan.adjusts:  # rare: a copy only when some row asks for it
            drawn_from = logits.copy()
            for i, ids_, bias in plan.biases:
                drawn_from[i, ids_] += bias
            for i, job in plan.penalised:
                assert job.seen is not None and job.counts is not None
                penalise(drawn_from[i], job.seen, job.counts, job.params)
            if plan.allowed is not None:
                rows = plan.constrained
                drawn_from[rows] = np.where(plan.allowed, drawn_from[rows], -np.inf)
        ids = plan.sampler.sample(drawn_from, plan.uniform()).tolist()
        if plan.matchers:  # each constrained row reads its character and works out its next mask
            chars = [ids[i] for i in plan.constrained.tolist()]
            plan.allowed = advance_all(plan.matchers, chars)
        if lps is None:
            for job, char in zip(plan.jobs, ids, strict=True):
                self._emit(job, char, None)
        else:
            for i, job in enumerate(plan.jobs):
                self._emit(job, ids[i], lps[i : i + 1])

    def _emit(self, job: Job, char: int, lps: np.ndarray | None) -> None:
        job.generated += 1
        job.next_input = char  # the model reads it at the next step
        self._emitted += 1
        if job.seen is not None:
            job.note_sampled(char)
        ending = None
        if job.stop.stops:
            text, stopped = job.stop.push(self.vocab[char])
        else:  # the common case, once per character: no call
            text, stopped = self.vocab[char], False
        if stopped:
            ending = Phase.STOP
        elif job.matcher is not None and job.matcher.complete:  # the text matches and nothing may follow
            text += job.stop.flush()
            ending = Phase.STOP
        elif job.generated >= job.params.max_new_chars:
            text += job.stop.flush()
            ending = Phase.LENGTH
        elif job.matcher is not None and job.matcher.dead_end:
            # Rare: llguidance prunes characters that lead nowhere, except across some grammar rules.
            field = job.params.constraint.field if job.params.constraint is not None else "structured_outputs"
            self._fail(job, "invalid_input", f"{field}: no character of this model can continue the text", field)
            return
        notes = job.notes
        if notes is None:
            if text:
                self._outbox.append((job, TextEvent(text)))
        else:
            assert lps is not None
            if job.params.logprobs:
                notes.logprobs.append(float(lps[0, char]))
            if job.params.top_logprobs:
                notes.top.append(top_alternatives(lps, job.params.top_logprobs, self.vocab)[0])
            self._release_text(job, text)
        if ending is not None:
            self._end_decoding(job, ending)

    def _release_text(self, job: Job, text: str) -> None:
        if not text:
            return
        if job.notes is None:
            self._outbox.append((job, TextEvent(text)))
        else:
            job.notes.unsent += text
            self._send_notes(job)

    def _send_notes(self, job: Job) -> None:
        assert job.notes is not None
        n = job.notes.ready()
        if n:
            self._outbox.append((job, job.notes.take(n)))

    # -- handing events to the event loop ----------------------------------------------------------

    def _flush(self) -> None:
        """Hand this iteration's events to the event loop in one call."""
        if self._emitted:
            self._generated_chars.inc(self._emitted)
            self._emitted = 0
        if not self._outbox or self._loop is None:
            return
        batch, self._outbox = self._outbox, []
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to receive
            self._loop.call_soon_threadsafe(self._deliver, batch)

    def _deliver(self, batch: list[tuple[Job, Event]]) -> None:
        """On the event loop: queue each event for its stream; a final event also completes the job."""
        for job, event in batch:
            try:
                self._deliver_one(job, event)
            except Exception:
                log.exception("delivering an event failed", extra={"model": self.name})
                if isinstance(event, FINAL_EVENTS):
                    self._complete(job)
                    job.events.put(event)
                else:
                    # The stream lost text: end it with an error now; the job's own final event,
                    # when it comes, still completes the job (and frees its session).
                    job.events.put(ErrorEvent("internal", "the server failed to deliver the text"))
                    self._errors.labels("internal").inc()
                    self.cancel(job)

    def _deliver_one(self, job: Job, event: Event) -> None:
        if isinstance(event, FINAL_EVENTS):
            self._complete(job)
        job.events.put(event)

    def _complete(self, job: Job) -> None:
        """Run the job's completion hook (it saves the session and releases its lease)."""
        if job.on_complete is None:
            return
        try:
            job.on_complete(job)
        except Exception:
            log.exception("completing a job failed", extra={"model": self.name})


def _steer(state: list[np.ndarray], i: int, job: Job) -> None:
    """Write the job's steered units into its row i of a step's new state, (layer, batch, hidden) per tensor."""
    for s in job.params.steer:
        if s.value is not None:
            state[s.tensor][s.layer, i, s.unit] = s.value
        elif s.add is not None:
            state[s.tensor][s.layer, i, s.unit] += s.add

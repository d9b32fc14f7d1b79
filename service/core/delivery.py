"""How work leaves the scheduler: sampled characters as text, cancels, a job's end, events to the loop.

A part of `scheduler.Scheduler`: its methods run with the scheduler's own state, and
`Scheduler.__init__` sets every attribute declared here. On the step thread, `_emit` turns a
sampled character into text (stops, lengths, constraints); `_finish` and `_fail` end a job and
free the row it held; every event waits in the outbox until `_flush` hands the iteration's events
to the event loop in one call. On the loop, `_deliver` puts each into its job's mailbox, and a
final event runs the job's completion hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque

import numpy as np
from prometheus_client import Counter

from service.core.events import FINAL_EVENTS, DoneEvent, ErrorEvent, Event, TextEvent
from service.core.jobs import Job, Phase
from service.core.sampling import top_alternatives
from service.core.slots import SlotTable

log = logging.getLogger("charstream.scheduler")


class Delivery:
    name: str
    vocab: tuple[str, ...]
    _lock: threading.Condition
    _cancels: list[Job]  # guarded by _lock: cancels the event loop asked for
    # Owned by the step thread: the jobs held, where their state is, how many ended.
    _prefill: dict[Job, None]
    _running: dict[Job, None]
    _slots: SlotTable
    _endings: int
    _outbox: list[tuple[Job, Event]]
    _emitted: int  # characters handed out since the last flush
    max_rows_per_request: int | None
    _intake: list[Job]  # owned by the step thread: taken from _joining, being admitted
    _rows_of: dict[object, int]  # jobs each request runs (a job's group)
    _queued: dict[object, deque[Job]]  # jobs waiting for one of their request's jobs to end
    _loop: asyncio.AbstractEventLoop | None
    _generated_chars: Counter
    _errors: Counter

    def cancel(self, job: Job) -> None:
        """Stop a job: it leaves at the next step boundary, after reading what it already sent."""
        if not job.phase.finished:
            with self._lock:
                self._cancels.append(job)
                self._lock.notify()

    # -- on the step thread ------------------------------------------------------------------------

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

    def _cancel_now(self, job: Job) -> None:
        if job.phase is Phase.JOINING and job in self._queued.get(job.group, ()):  # waiting for its request's row
            self._finish(job, Phase.CANCELLED, keep=False)
        elif job.phase in (Phase.PREFILL, Phase.DECODING) and job.read < len(job.prompt):
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
        self._count_emitted()  # before the job stops counting as running: a scrape never sees it half-counted
        self._prefill.pop(job, None)
        self._running.pop(job, None)
        self._leave_group(job)
        self._slots.give_back(job, keep=keep and job.wants_state)
        job.phase = phase
        if job.notes is not None:
            self._send_notes(job)
        self._outbox.append((job, DoneEvent(phase.finish_reason, job.generated)))

    def _fail(self, job: Job, code: str, message: str, field: str | None = None) -> None:
        if job.phase.finished:
            return
        self._count_emitted()
        self._prefill.pop(job, None)
        self._running.pop(job, None)
        self._leave_group(job)
        self._slots.give_back(job, keep=False)
        job.phase = Phase.FAILED
        self._errors.labels(code).inc()
        self._outbox.append((job, ErrorEvent(code, message, field)))

    def _leave_group(self, job: Job) -> None:
        """A job of a request ends: a waiting one of the same request is taken in at the next iteration."""
        group = job.group
        if group is None or self.max_rows_per_request is None:
            return
        queued = self._queued.get(group)
        if queued is not None and job in queued:  # it never ran: it held no place
            queued.remove(job)
        else:
            self._rows_of[group] -= 1
            if queued:
                self._intake.append(queued.popleft())
        if not self._rows_of.get(group, 1):
            del self._rows_of[group]
        if queued is not None and not queued:
            del self._queued[group]

    def _count_emitted(self) -> None:
        """Add the characters handed out since the last count to the counter (one lock, not one per character)."""
        if self._emitted:
            self._generated_chars.inc(self._emitted)
            self._emitted = 0

    def _flush(self) -> None:
        """Hand this iteration's events to the event loop in one call."""
        self._count_emitted()
        if not self._outbox or self._loop is None:
            return
        batch, self._outbox = self._outbox, []
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to receive
            self._loop.call_soon_threadsafe(self._deliver, batch)

    # -- on the event loop -------------------------------------------------------------------------

    def _deliver(self, batch: list[tuple[Job, Event]]) -> None:
        """Queue each event for its stream; a final event also completes the job."""
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

"""The engine work of an iteration: prompt chunks read, then one batched step and its sampling.

A part of `scheduler.Scheduler`: its methods run with the scheduler's own state, and
`Scheduler.__init__` sets every attribute declared here. `_prefill_batch` reads one chunk of
several prompts in one seq=T call; `_step` runs one seq=1 call over a batch of decoding jobs and
samples each row's next character, reusing the last step's `StepPlan` while the batch holds
still. What each sampled character becomes is `delivery`'s.
"""

from __future__ import annotations

import time

import numpy as np

from service.core import prompt_notes
from service.core.constraints import advance_all
from service.core.delivery import Delivery
from service.core.engine import Engine
from service.core.jobs import Job, Phase
from service.core.sampling import log_softmax, penalise
from service.core.step_plan import StepPlan
from service.metrics import CallMetrics

ACTIVATION_DECIMALS = 4  # unit values are sent rounded to this many decimals


class RuntimeCallFailed(Exception):
    """onnxruntime raised: the model failed, not the scheduler (the client sees errors.EngineFailed)."""


class Stepping(Delivery):
    engine: Engine
    # The last step's sampling plan, reused while the batch stays the same: the same jobs and
    # no job ended since (`_endings` counts them; an ending job stays one step, FINISHING).
    _steady: StepPlan | None
    _step_metrics: CallMetrics
    _prime_metrics: CallMetrics

    def _prefill_batch(self, jobs: list[Job], n: int) -> None:
        """Read the next n characters of each job's prompt in one call."""
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
                prompt_notes.note_chunk(jobs[b], first, logits[b], n, self.vocab)
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
            prompt_notes.note_prompt_logprobs([jobs[i] for i in forced], slots.logits[rows[forced]], self.vocab)
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
            job.last_input, job.next_input = job.next_input, None
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


def _steer(state: list[np.ndarray], i: int, job: Job) -> None:
    """Write the job's steered units into its row i of a step's new state, (layer, batch, hidden) per tensor."""
    for s in job.params.steer:
        if s.value is not None:
            state[s.tensor][s.layer, i, s.unit] = s.value
        elif s.add is not None:
            state[s.tensor][s.layer, i, s.unit] += s.add

"""The scheduler's invariant under injected faults: every submitted job gets exactly one final event
and its completion hook runs once, whatever raises where; the scheduler keeps serving after."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core.engine import Engine
from service.core.events import FINAL_EVENTS, DoneEvent, ErrorEvent, Event, TextEvent
from service.core.jobs import Job, Phase
from service.core.sampling import ActivationSpec, SamplingParams
from service.core.scheduler import Scheduler
from service.metrics import Metrics

# Every stage of a job's life, by the scheduler method that runs it.
STAGES = [
    "_admit",  # JOINING -> PREFILL / DECODING
    "_prefill_batch",  # a chunk of prompts read in one call
    "_prompt_read",  # PREFILL -> DECODING
    "_read",  # the batched step
    "_sample",  # sampling the next characters
    "_emit",  # stop and length checks, text out
    "_cancel_now",  # a cancel applied
    "_finish",  # leaving with a DoneEvent
    "_iterate",  # the whole iteration, outside every per-stage guard
    "_deliver_one",  # on the event loop: into the mailbox, completion hook
]


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> Engine:
    return Engine(models_dir / "tiny-lstm" / "model.onnx")


def job_for(engine: Engine, prompt: str, params: SamplingParams, seed: int, wants_state: bool = True) -> Job:
    info = engine.info
    return Job(
        prompt=[info.vocab_index[c] for c in prompt],
        state=[np.zeros((info.num_layers, info.hidden_size), np.float32) for _ in info.state_names],
        logits=None,
        params=params,
        rng=np.random.default_rng(seed),
        wants_state=wants_state,
    )


def mixed_jobs(engine: Engine) -> list[Job]:
    """Prompts short and long, feeds, stops, annotations, stateless requests."""
    annotated = SamplingParams(
        max_new_chars=12, top_logprobs=3, logprobs=True, activations=ActivationSpec(1, 1, (0, 5), prompt=True)
    )
    return [
        job_for(engine, "ROMEO:", SamplingParams(max_new_chars=20), 1),
        job_for(engine, "JULIET:" * 120, SamplingParams(max_new_chars=15), 2),  # several prefill chunks
        job_for(engine, "KING:", SamplingParams(max_new_chars=0), 3),  # a feed
        job_for(engine, "QUEEN:", SamplingParams(temperature=0.0, max_new_chars=40, stop=("e",)), 4),
        job_for(engine, "First:", annotated, 5),
        job_for(engine, "Second:", SamplingParams(max_new_chars=25), 6, wants_state=False),
    ]


class Fault:
    """Wraps a scheduler method so that its `on`-th call raises, as a bug or a broken part would."""

    def __init__(self, real: Callable[..., Any], on: int) -> None:
        self.real, self.on, self.calls = real, on, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == self.on:
            raise RuntimeError("injected fault")
        return self.real(*args)


async def finals_of(job: Job) -> list[Event]:
    """Every event up to the final one, then a short wait to catch anything after it."""
    events: list[Event] = []
    while not any(isinstance(e, FINAL_EVENTS) for e in events):
        events.extend(await asyncio.wait_for(job.events.take(), timeout=60))
    with pytest.raises(asyncio.TimeoutError):
        events.extend(await asyncio.wait_for(job.events.take(), timeout=0.2))
    return events


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("on", [1, 3])
def test_every_job_ends_once_whatever_raises_where(engine: Engine, stage: str, on: int) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        scheduler = Scheduler("m", engine, metrics, prefill_chunk=64)
        fault = Fault(getattr(scheduler, stage), on)
        setattr(scheduler, stage, fault)
        scheduler.start()
        completions: Counter[int] = Counter()
        jobs = mixed_jobs(engine)
        for i, job in enumerate(jobs):
            job.on_complete = lambda j, i=i: completions.update([i])
            scheduler.submit(job)
        victim = jobs[1]
        scheduler.cancel(victim)  # so that the cancel stage runs too
        outcomes = await asyncio.gather(*(finals_of(j) for j in jobs))
        for i, events in enumerate(outcomes):
            finals = [e for e in events if isinstance(e, FINAL_EVENTS)]
            assert len(finals) == 1, (stage, i, events)
            assert isinstance(events[-1], FINAL_EVENTS)
            assert jobs[i].phase.finished
        assert completions == Counter(range(len(jobs))), (stage, completions)
        # Every job that ended in an error is counted once, under the code its client saw.
        seen = Counter(e.code for events in outcomes for e in events if isinstance(e, ErrorEvent))
        for code, count in seen.items():
            assert metrics.registry.get_sample_value("charstream_generation_errors_total", {"code": code}) == count
        assert fault.calls >= on or stage in ("_cancel_now", "_prompt_read"), f"{stage} never reached call {on}"
        # The scheduler goes on serving, with nothing left held.
        setattr(scheduler, stage, fault.real)
        later = job_for(engine, "KING:", SamplingParams(max_new_chars=10), 9)
        scheduler.submit(later)
        events = await finals_of(later)
        assert isinstance(events[-1], DoneEvent)
        assert len("".join(e.text for e in events if isinstance(e, TextEvent))) == 10
        assert scheduler.active == 0 and not scheduler._slots._rows  # every slot given back
        await scheduler.stop()

    asyncio.run(scenario())


def test_a_fault_fails_only_the_jobs_of_its_stage(engine: Engine) -> None:
    """A prompt read that raises fails the prompts of that call; streams already decoding go on."""

    async def scenario() -> None:
        scheduler = Scheduler("m", engine, Metrics())
        scheduler.start()
        running = job_for(engine, "ROMEO:", SamplingParams(max_new_chars=400), 1)
        scheduler.submit(running)
        first = await asyncio.wait_for(running.events.take(), timeout=30)
        assert isinstance(first[0], TextEvent)
        scheduler._prefill_batch = Fault(scheduler._prefill_batch, 1)  # type: ignore[method-assign]
        doomed = job_for(engine, "JULIET:", SamplingParams(max_new_chars=20), 2)
        scheduler.submit(doomed)
        doomed_events = await finals_of(doomed)
        assert isinstance(doomed_events[-1], ErrorEvent) and doomed_events[-1].code == "internal"
        assert doomed.phase is Phase.FAILED
        rest = await finals_of(running)
        assert isinstance(rest[-1], DoneEvent) and rest[-1].finish_reason == "length"
        await scheduler.stop()

    asyncio.run(scenario())


def test_stop_ends_every_held_job_with_shutting_down(engine: Engine) -> None:
    async def scenario() -> None:
        scheduler = Scheduler("m", engine, Metrics())
        scheduler.start()
        jobs = [job_for(engine, "ROMEO:" * 50, SamplingParams(max_new_chars=4000), s) for s in range(5)]
        for job in jobs:
            scheduler.submit(job)
        await asyncio.sleep(0.2)
        await scheduler.stop()
        for job in jobs:
            events = await finals_of(job)
            assert isinstance(events[-1], ErrorEvent) and events[-1].code == "shutting_down"

    asyncio.run(scenario())

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from service.core.engine import Engine, StepBinding
from service.core.events import DoneEvent, ErrorEvent, Event, TextEvent
from service.core.jobs import Job
from service.core.sampling import SamplingParams
from service.core.scheduler import Scheduler
from service.metrics import Metrics


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> Engine:
    return Engine(models_dir / "tiny-lstm" / "model.onnx")


@dataclass
class Outcome:
    text: str
    final: DoneEvent | ErrorEvent


def make_job(engine: Engine, prompt: str, params: SamplingParams, seed: int, wants_state: bool = True) -> Job:
    index = engine.info.vocab_index
    return Job(
        prompt=[index[c] for c in prompt],
        state=[
            np.zeros((engine.info.num_layers, engine.info.hidden_size), np.float32) for _ in engine.info.state_names
        ],
        logits=None,
        params=params,
        rng=np.random.default_rng(seed),
        wants_state=wants_state,
    )


async def drain(job: Job) -> Outcome:
    texts = []
    while True:
        for event in await job.events.take():
            if isinstance(event, TextEvent):
                texts.append(event.text)
            else:
                return Outcome("".join(texts), event)


SPECS = [
    (f"{name}:", SamplingParams(temperature=t, top_k=k, top_p=p, max_new_chars=n), seed)
    for seed, (name, t, k, p, n) in enumerate(
        [
            ("ROMEO", 0.0, 0, 1.0, 60),
            ("JULIET", 0.8, 0, 1.0, 120),
            ("KING", 1.0, 5, 1.0, 15),
            ("QUEEN", 1.2, 0, 0.9, 90),
            ("First Citizen", 0.5, 10, 0.95, 40),
            ("MENENIUS", 1.0, 0, 1.0, 75),
        ]
        * 4
    )
]


def run_specs(engine: Engine, batching: bool, stagger: bool) -> tuple[list[Outcome], Metrics]:
    metrics = Metrics()

    async def scenario() -> list[Outcome]:
        scheduler = Scheduler("m", engine, metrics, batching=batching)
        scheduler.start()
        jobs = [make_job(engine, prompt, params, seed) for prompt, params, seed in SPECS]
        half = len(jobs) // 2
        tasks = []
        for i, job in enumerate(jobs):
            if stagger and i == half:
                await asyncio.sleep(0.05)  # the second half joins a batch already running
            scheduler.submit(job)
            tasks.append(asyncio.create_task(drain(job)))
        outcomes = await asyncio.gather(*tasks)
        assert scheduler.active == 0
        await scheduler.stop()
        return outcomes

    return asyncio.run(scenario()), metrics


def test_batched_and_unbatched_give_the_same_text(engine: Engine) -> None:
    batched, metrics = run_specs(engine, batching=True, stagger=True)
    alone, _ = run_specs(engine, batching=False, stagger=False)
    for (prompt, params, _), a, b in zip(SPECS, batched, alone, strict=True):
        assert isinstance(a.final, DoneEvent) and a.final.finish_reason == "length"
        assert a.text == b.text, prompt
        assert len(a.text) == params.max_new_chars
    # The batch really was shared: most steps ran many sessions at once.
    samples = {
        s.name: s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.labels.get("kind") == "step"
    }
    steps = samples["charstream_batch_size_count"]
    total_rows = samples["charstream_batch_size_sum"]
    assert total_rows / steps > 4


def test_logits_batched_vs_single_row(engine: Engine) -> None:
    """The numeric difference behind the identical text above, reported for the record."""
    rng = np.random.default_rng(0)
    b, v = 32, engine.info.vocab_size
    tokens = rng.integers(0, v, (b, 1))
    state = [rng.normal(size=(2, b, 48)).astype(np.float32) for _ in engine.info.state_names]
    batched, _ = engine.run(tokens, state)
    single = np.concatenate([engine.run(tokens[i : i + 1], [s[:, i : i + 1] for s in state])[0] for i in range(b)])
    diff = float(np.abs(batched - single).max())
    print(f"largest logit difference, batch 32 vs 32 single-row calls: {diff:.3g}")
    assert diff <= 1e-5


def test_cancel_stops_within_one_step_under_load(engine: Engine) -> None:
    async def scenario() -> None:
        scheduler = Scheduler("m", engine, Metrics())
        scheduler.start()
        others = [make_job(engine, "A:", SamplingParams(max_new_chars=150), s) for s in range(31)]
        victim = make_job(engine, "B:", SamplingParams(max_new_chars=4000), 99)
        for job in [*others, victim]:
            scheduler.submit(job)
        other_tasks = [asyncio.create_task(drain(j)) for j in others]
        seen = 0
        while seen < 10:
            for event in await victim.events.take():
                assert isinstance(event, TextEvent)
                seen += len(event.text)
        # The step thread never waits for the event loop, so by now it may be any number of steps past
        # what this loop has seen: count from what it had sampled when the cancel is made.
        sampled_at_cancel = victim.generated
        scheduler.cancel(victim)
        after: list[Event] = []
        while not after or isinstance(after[-1], TextEvent):
            after.extend(await victim.events.take())
        # Anything already queued before the cancel may arrive; nothing sampled after it does.
        assert isinstance(after[-1], DoneEvent) and after[-1].finish_reason == "cancelled"
        assert victim.generated <= seen + sum(len(e.text) for e in after if isinstance(e, TextEvent))
        # The cancel is applied before the next step: past the step under way (and one that began as
        # `generated` was read), nothing more is sampled.
        assert victim.generated - sampled_at_cancel <= 2
        outcomes = await asyncio.gather(*other_tasks)
        assert all(isinstance(o.final, DoneEvent) and len(o.text) == 150 for o in outcomes)
        await scheduler.stop()

    asyncio.run(scenario())


def test_a_real_onnxruntime_error_fails_only_its_own_jobs(engine: Engine) -> None:
    async def scenario() -> None:
        scheduler = Scheduler("m", engine, Metrics())
        scheduler.start()
        good = [make_job(engine, "ROMEO:", SamplingParams(max_new_chars=30), s) for s in range(4)]
        bad = make_job(engine, "ab", SamplingParams(max_new_chars=30), 5)
        bad.prompt = [engine.info.vocab_size + 1000]  # out of the embedding's range: Gather fails
        for job in [*good, bad]:
            scheduler.submit(job)
        outcomes = await asyncio.gather(*(drain(j) for j in [*good, bad]))
        assert all(isinstance(o.final, DoneEvent) and len(o.text) == 30 for o in outcomes[:4])
        assert isinstance(outcomes[4].final, ErrorEvent) and outcomes[4].final.code == "engine_error"
        # The scheduler keeps serving after the failure.
        later = make_job(engine, "KING:", SamplingParams(max_new_chars=10), 1)
        scheduler.submit(later)
        assert len((await drain(later)).text) == 10
        await scheduler.stop()

    asyncio.run(scenario())


class FailingStep:
    """The real engine, except that one chosen call (a prompt read or a step) raises as onnxruntime would."""

    def __init__(self, engine: Engine, fail_call: int) -> None:
        self.engine, self.fail_call, self.calls = engine, fail_call, 0
        self.info = engine.info

    def _count(self) -> None:
        self.calls += 1
        if self.calls == self.fail_call:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : injected")

    def run(self, tokens: np.ndarray, state: list[np.ndarray]):  # type: ignore[no-untyped-def]
        self._count()
        return self.engine.run(tokens, state)

    def binding(self, batch: int) -> FailingBinding:
        return FailingBinding(self.engine.binding(batch), self._count)


class FailingBinding:
    def __init__(self, real: StepBinding, count: Callable[[], None]) -> None:
        self.real, self.count = real, count
        self.tokens, self.logits = real.tokens, real.logits

    @property
    def state_in(self) -> list[np.ndarray]:
        return self.real.state_in

    @property
    def state_out(self) -> list[np.ndarray]:
        return self.real.state_out

    def carry(self) -> None:
        self.real.carry()

    def run(self) -> None:
        self.count()
        self.real.run()


def test_a_failed_step_errors_its_batch_and_the_scheduler_goes_on(engine: Engine) -> None:
    async def scenario() -> None:
        flaky = FailingStep(engine, fail_call=5)
        scheduler = Scheduler("m", flaky, Metrics())  # type: ignore[arg-type]
        scheduler.start()
        jobs = [make_job(engine, "ROMEO:", SamplingParams(max_new_chars=20), s) for s in range(3)]
        for job in jobs:
            scheduler.submit(job)
        outcomes = await asyncio.gather(*(drain(j) for j in jobs))
        assert all(isinstance(o.final, ErrorEvent) for o in outcomes)
        later = make_job(engine, "ROMEO:", SamplingParams(max_new_chars=20), 0)
        scheduler.submit(later)
        assert len((await drain(later)).text) == 20
        await scheduler.stop()

    asyncio.run(scenario())


def test_feed_only_job_reads_the_prompt_and_stops(engine: Engine) -> None:
    async def scenario() -> None:
        scheduler = Scheduler("m", engine, Metrics())
        scheduler.start()
        job = make_job(engine, "To be, or not to be", SamplingParams(max_new_chars=0), 0)
        scheduler.submit(job)
        outcome = await drain(job)
        assert isinstance(outcome.final, DoneEvent) and outcome.final.finish_reason == "fed"
        assert job.absorbed == len("To be, or not to be") and job.logits is not None
        await scheduler.stop()

    asyncio.run(scenario())


def test_stop_sequence_ends_generation_and_is_not_returned(engine: Engine) -> None:
    async def scenario() -> None:
        scheduler = Scheduler("m", engine, Metrics())
        scheduler.start()
        free = make_job(engine, "ROMEO:", SamplingParams(temperature=0.0, max_new_chars=200), 0)
        scheduler.submit(free)
        text = (await drain(free)).text
        stop = text[30:32]
        cut = text.index(stop)
        stopped = make_job(engine, "ROMEO:", SamplingParams(temperature=0.0, max_new_chars=200, stop=(stop,)), 0)
        scheduler.submit(stopped)
        outcome = await drain(stopped)
        assert isinstance(outcome.final, DoneEvent) and outcome.final.finish_reason == "stop"
        assert outcome.text == text[:cut]
        await scheduler.stop()

    asyncio.run(scenario())

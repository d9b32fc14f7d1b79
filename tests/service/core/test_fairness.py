"""Fairness between jobs: a long prompt is read in chunks between decode steps, so the streams beside
it keep flowing; and past max_batch_size every running job is still stepped at every iteration.

Counted, not timed: while a 20,000-character prompt is read, a stream that was already running
must receive many characters (one per scheduler iteration). Read in one call, it would receive
none until the prompt was done."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from pathlib import Path

import pytest
from websockets.sync.client import connect

from service.core.engine import Engine
from service.core.events import DoneEvent
from service.core.jobs import Job
from service.core.sampling import SamplingParams
from service.core.scheduler import Scheduler
from service.metrics import Metrics
from tests.service.core.test_scheduler import Outcome, drain, make_job
from tests.utils import run_server

PROMPT_CHARS = 20_000
CHUNK = 64


def test_other_streams_flow_while_a_long_prompt_is_read(models_dir: Path) -> None:
    prompt = ("ROMEO: what light through yonder window breaks\n" * 500)[:PROMPT_CHARS]
    with run_server(
        models_dir=models_dir,
        default_model="tiny-lstm",
        max_prompt_chars=PROMPT_CHARS,
        max_new_chars=1_000_000,
        prefill_chunk=CHUNK,
    ) as server:
        events: list[str] = []  # the running stream's text and two markers, in the order they happened
        lock = threading.Lock()
        started, finished = threading.Event(), threading.Event()

        def running_stream() -> None:
            with connect(f"{server.ws_url}/v1/stream") as ws:
                ws.send(json.dumps({"type": "generate", "prompt": "KING:", "max_new_chars": 1_000_000, "seed": 1}))
                while True:
                    message = json.loads(ws.recv(timeout=60))
                    if message["type"] == "text":
                        with lock:
                            events.append("c" * len(message["text"]))
                        started.set()
                    if message["type"] in ("done", "error") or finished.is_set():
                        return  # leaving closes the connection, which cancels the generation

        thread = threading.Thread(target=running_stream, daemon=True)
        thread.start()
        assert started.wait(timeout=60)
        with connect(f"{server.ws_url}/v1/stream") as ws:
            with lock:
                events.append("SENT")
            ws.send(json.dumps({"type": "generate", "prompt": prompt, "max_new_chars": 1}))
            while json.loads(ws.recv(timeout=300))["type"] != "text":
                pass
            with lock:
                events.append("READ")
            ws.send(json.dumps({"type": "cancel"}))
        finished.set()
        thread.join(timeout=60)
        with lock:
            window = events[events.index("SENT") + 1 : events.index("READ")]
        arrivals = [len(e) for e in window]
        # ~PROMPT_CHARS / CHUNK = 312 iterations, one character each for the running stream.
        assert sum(arrivals) >= 50, sum(arrivals)


async def run_all(scheduler: Scheduler, jobs: list[Job], finished: list[int]) -> list[Outcome]:
    """Submit the jobs in order and wait for them all; `finished` gets their indices as they end."""

    async def follow(index: int, job: Job) -> Outcome:
        outcome = await drain(job)
        finished.append(index)
        return outcome

    for job in jobs:
        scheduler.submit(job)
    return list(await asyncio.gather(*(follow(i, job) for i, job in enumerate(jobs))))


def test_past_max_batch_size_no_job_waits_for_another_to_end(models_dir: Path) -> None:
    """Twelve long jobs fill three batches of four; a short one submitted after them is stepped at
    every iteration too (the batches are cut from all running jobs), so it ends long before them."""
    engine = Engine(models_dir / "tiny-lstm" / "model.onnx")
    finished: list[int] = []

    async def scenario() -> list[Outcome]:
        scheduler = Scheduler("m", engine, Metrics(), max_batch_size=4)
        scheduler.start()
        lengths = [200] * 12 + [5]
        jobs = [
            make_job(engine, "ROMEO:", SamplingParams(max_new_chars=n, temperature=0.0), seed)
            for seed, n in enumerate(lengths)
        ]

        outcomes = await run_all(scheduler, jobs, finished)
        await scheduler.stop()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o.final, DoneEvent) for o in outcomes)
    assert [len(o.text) for o in outcomes] == [200] * 12 + [5]
    assert finished[0] == 12  # the last one submitted, beyond three full batches, ended first


class Ticks:
    """A clock that moves one whole tick each time it is read: every chunk and every decode step
    takes one tick, so the share of the thread reading takes is counted, not timed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.mark.parametrize(("share", "steps_per_chunk"), [(1.0, 1), (0.5, 1), (0.25, 3), (0.125, 7)])
def test_reading_takes_at_most_its_share_while_streams_decode(
    models_dir: Path, share: float, steps_per_chunk: int
) -> None:
    """A chunk that took t owes (1 - share) / share x t of decoding before the next (the decode step of
    its own iteration included): at share 0.25 a running stream gets three characters per chunk of a
    long prompt, at 0.5 and 1 one. Counted on the step thread, between one chunk and the next."""
    engine = Engine(models_dir / "tiny-lstm" / "model.onnx")
    chunks = 20

    async def scenario() -> list[int]:
        scheduler = Scheduler("m", engine, Metrics(), prefill_chunk=CHUNK, prefill_share=share, clock=Ticks())
        scheduler.start()
        stream = make_job(engine, "KING:", SamplingParams(max_new_chars=100_000, temperature=0.0), 1)
        scheduler.submit(stream)
        while stream.generated == 0:
            await asyncio.sleep(0.001)
        prompt = make_job(engine, "ROMEO: " * (chunks * CHUNK // 7 + 1), SamplingParams(max_new_chars=1), 2)
        prompt.prompt = prompt.prompt[: chunks * CHUNK]
        at_chunks: list[int] = []  # the stream's characters when each chunk was read (on the step thread)
        prompt.on_chunk = lambda read, state, logits: at_chunks.append(stream.generated)
        scheduler.submit(prompt)
        await drain(prompt)
        scheduler.cancel(stream)
        await drain(stream)
        await scheduler.stop()
        return at_chunks

    at_chunks = asyncio.run(scenario())
    assert len(at_chunks) == chunks
    assert [b - a for a, b in itertools.pairwise(at_chunks)] == [steps_per_chunk] * (chunks - 1)


def test_a_request_runs_at_most_its_rows_and_the_rest_wait(models_dir: Path) -> None:
    """Six choices of one request with a cap of two run two at a time; a single job submitted after
    them runs beside the first two at once, so it ends before the four that waited; the texts are
    what they would be without the cap."""
    engine = Engine(models_dir / "tiny-lstm" / "model.onnx")

    async def scenario(cap: int | None) -> tuple[list[str], list[int]]:
        scheduler = Scheduler("m", engine, Metrics(), max_rows_per_request=cap)
        scheduler.start()
        request = object()
        jobs = [make_job(engine, "ROMEO:", SamplingParams(max_new_chars=60), seed) for seed in range(7)]
        for job in jobs[:6]:
            job.group = request
        finished: list[int] = []
        outcomes = await run_all(scheduler, jobs, finished)
        assert not scheduler._rows_of and not scheduler._queued  # nothing left counted
        await scheduler.stop()
        return [o.text for o in outcomes], finished

    texts, finished = asyncio.run(scenario(2))
    assert asyncio.run(scenario(None))[0] == texts and all(len(t) == 60 for t in texts)
    assert finished.index(6) < min(finished.index(i) for i in range(2, 6)), finished
    assert set(finished[:3]) == {0, 1, 6}, finished


def test_a_waiting_choice_can_be_cancelled(models_dir: Path) -> None:
    engine = Engine(models_dir / "tiny-lstm" / "model.onnx")

    async def scenario() -> list[Outcome]:
        scheduler = Scheduler("m", engine, Metrics(), max_rows_per_request=1)
        scheduler.start()
        request = object()
        jobs = [make_job(engine, "ROMEO:", SamplingParams(max_new_chars=200), seed) for seed in range(3)]
        for job in jobs:
            job.group = request
            scheduler.submit(job)
        while jobs[0].generated == 0:
            await asyncio.sleep(0.001)
        scheduler.cancel(jobs[2])  # still waiting for the request's one row
        outcomes = await asyncio.gather(*(drain(job) for job in jobs))
        assert scheduler.active == 0 and not scheduler._queued
        await scheduler.stop()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert [len(o.text) for o in outcomes] == [200, 200, 0]
    assert isinstance(outcomes[2].final, DoneEvent) and outcomes[2].final.finish_reason == "cancelled"

"""Fairness between jobs: a long prompt is read in chunks between decode steps, so the streams beside
it keep flowing; and past max_batch_size every running job is still stepped at every iteration.

Counted, not timed: while a 20,000-character prompt is read, a stream that was already running
must receive many characters (one per scheduler iteration). Read in one call, it would receive
none until the prompt was done."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

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

        async def follow(index: int, job: Job) -> Outcome:
            outcome = await drain(job)
            finished.append(index)
            return outcome

        for job in jobs:
            scheduler.submit(job)
        outcomes = await asyncio.gather(*(follow(i, job) for i, job in enumerate(jobs)))
        await scheduler.stop()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o.final, DoneEvent) for o in outcomes)
    assert [len(o.text) for o in outcomes] == [200] * 12 + [5]
    assert finished[0] == 12  # the last one submitted, beyond three full batches, ended first

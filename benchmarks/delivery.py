"""Delivery settings side by side: 64 WebSocket streams (or `--streams N`) against servers that differ in one
setting each, in interleaved rounds, set against the in-process ceiling measured in the same
rounds. Reports aggregate chars/s, its ratio to the ceiling at batch 64, the p99 gap between
characters and its ratio to the ceiling's step time at batch 64 (the two numbers its targets bound).
Beside them, where the time goes: the CPU the server and the clients used (they share the
machine's cores), and how long a decode step took against how much of it was onnxruntime
(from the server's own step histogram), so the rest is the server's Python and its waits.

    python -m benchmarks.delivery --variant int8 \\
        default CHARSTREAM_SWITCH_INTERVAL_US=200 CHARSTREAM_STREAM_INTERVAL=4

The clients run in this process, on the same two cores as the server: when both are busy, the
operating system shares a core between the server's step thread and the clients, and the step
slows down. `--client-nice 10` lowers this process's CPU priority once the servers have started
(the ceiling, measured alone, is unaffected), which is closer to a deployment, where the clients
are other machines; the results say which was used.

A setting `checkout=PATH` runs that server from another checkout of the repository (a git
worktree of an older commit, say), so two versions of the code are compared in one run:

    git worktree add /tmp/before HEAD~1
    python -m benchmarks.delivery default checkout=/tmp/before
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import serving, ws_client
from benchmarks.common import REPO, ServerProcess, model_file, own_cpu_seconds, start_charstream, table, write_results
from service.core import TextEvent

STREAMS = 64
TARGET = 0.9  # of the ceiling


class Run(NamedTuple):
    chars_per_s: float
    frames_per_s: float
    gaps: list[float]
    server_cores: float  # CPU seconds the server process used per wall second
    client_cores: float  # the same for this process, the 64 clients
    step_period_ms: float  # wall time per decode step
    step_ort_ms: float  # of which inside onnxruntime (the server's own step histogram)


def step_totals(server: ServerProcess) -> tuple[float, float]:
    """(seconds, calls) of the server's one-character onnxruntime steps so far, from /metrics."""
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    totals = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "charstream_step_seconds":
            for sample in family.samples:
                kind = sample.name.rsplit("_", 1)[-1]
                if kind in totals and sample.labels.get("kind") == "step":
                    totals[kind] += sample.value
    return totals["sum"], totals["count"]


async def run_streams(port: int, chars: int, streams: int = STREAMS) -> tuple[float, float, list[float]]:
    requests = [{"type": "generate", "prompt": "ROMEO:", "max_new_chars": chars, "seed": i} for i in range(streams)]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(ws_client.generate("127.0.0.1", port, r) for r in requests))
    wall = time.perf_counter() - t0
    gaps = [b - a for r in results for a, b in pairwise(r.arrivals)]
    return sum(len(r.arrivals) for r in results) / wall, sum(r.frames for r in results) / wall, gaps


def measured_run(server: ServerProcess, chars: int, streams: int) -> Run:
    """One round against one server, with the CPU both sides used: on two cores they compete."""
    ort0, steps0 = step_totals(server)
    wall0, server0, client0 = time.perf_counter(), server.cpu_seconds(), own_cpu_seconds()
    rate, frame_rate, gaps = uvloop.run(run_streams(server.port, chars, streams))
    wall = time.perf_counter() - wall0
    server_cores, client_cores = (server.cpu_seconds() - server0) / wall, (own_cpu_seconds() - client0) / wall
    ort1, steps1 = step_totals(server)
    steps = max(1.0, steps1 - steps0)
    period_ms, ort_ms = wall / steps * 1e3, (ort1 - ort0) / steps * 1e3
    return Run(rate, frame_rate, gaps, server_cores, client_cores, period_ms, ort_ms)


def scheduler_alone(chars: int, streams: int, model: Path) -> float:
    """chars/s of 64 jobs through the scheduler in this process, no server and no network, on the
    graph file `model`.

    Between the ceiling (bare steps) and a server over loopback: what the scheduler's own work
    per step (rows, sampling parameters, stops, events, one hand-off to the event loop) costs.
    """
    from service.core import Engine, Job, Mailbox, SamplingParams, Scheduler
    from service.metrics import Metrics
    from service.settings import STREAM_INTERVAL, load_settings

    engine = Engine(model, load_settings().ort_threads)
    info = engine.info
    prompt = [info.vocab_index[c] for c in "ROMEO:"]

    async def run() -> float:
        scheduler = Scheduler("bench", engine, Metrics())
        scheduler.start()
        jobs = [
            Job(
                prompt=prompt,
                state=[np.zeros((info.num_layers, info.hidden_size), np.float32) for _ in info.state_names],
                logits=None,
                params=SamplingParams(max_new_chars=chars),
                rng=np.random.default_rng(i),
                events=Mailbox(STREAM_INTERVAL),
            )
            for i in range(streams)
        ]

        async def drain(job: Job) -> int:
            received = 0
            while True:
                for event in await job.events.take():
                    if isinstance(event, TextEvent):
                        received += len(event.text)
                    else:
                        return received

        t0 = time.perf_counter()
        for job in jobs:
            scheduler.submit(job)
        received = sum(await asyncio.gather(*(drain(j) for j in jobs)))
        wall = time.perf_counter() - t0
        await scheduler.stop()
        return received / wall

    return uvloop.run(run())


def server_for(spec: str, port: int, variant: str) -> ServerProcess:
    """A server for 'default' or NAME=VALUE[,NAME=VALUE]: environment settings, or checkout=PATH."""
    settings = {} if spec == "default" else dict(item.split("=", 1) for item in spec.split(","))
    checkout = Path(settings.pop("checkout", REPO))
    return start_charstream(port, checkout, variant=variant, **settings)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "settings", nargs="+", help="'default' or NAME=VALUE[,NAME=VALUE] per server (checkout=PATH: other code)"
    )
    parser.add_argument("--variant", default="fp32", choices=["fp32", "int8"])
    parser.add_argument("--chars", type=int, default=400, help="characters per stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=STREAMS, help="WebSocket streams (and the ceiling's batch)")
    parser.add_argument("--port", type=int, default=8861)
    parser.add_argument("--name", default="delivery", help="results file name")
    parser.add_argument("--client-nice", type=int, default=0, help="lower the clients' CPU priority by this much")
    return parser.parse_args()


class Rounds(NamedTuple):
    runs: dict[str, list[Run]]  # settings -> one Run a round
    ceilings: list[float]  # chars/s, one a round
    alone: list[float]  # the scheduler alone, chars/s, one a round


def measure(args: argparse.Namespace) -> Rounds:
    """Every server started, warmed up, then the ceiling, the scheduler alone and each server, in rounds."""
    servers = {spec: server_for(spec, args.port + i, args.variant) for i, spec in enumerate(args.settings)}
    os.nice(args.client_nice)  # after the servers started: they keep the default priority
    rounds = Rounds({spec: [] for spec in servers}, [], [])
    model = model_file(args.variant)
    try:
        for server in servers.values():
            uvloop.run(run_streams(server.port, 100))  # warm-up
        for _ in range(args.rounds):
            rounds.ceilings.append(serving.ceiling(args.streams, 300, model))
            rounds.alone.append(scheduler_alone(args.chars, args.streams, model))
            for spec, server in servers.items():
                rounds.runs[spec].append(measured_run(server, args.chars, args.streams))
    finally:
        for server in servers.values():
            server.stop()
    return rounds


def row(spec: str, results: list[Run], ceiling: float, step_ms: float) -> dict[str, Any]:
    """One server's medians over the rounds, and what they make of the targets."""
    rate = statistics.median(r.chars_per_s for r in results)
    p99 = statistics.median(float(np.percentile(r.gaps, 99)) for r in results) * 1e3
    # The server's CPU outside onnxruntime (the step thread's Python, the event loop, framing,
    # sends), per frame delivered; almost all of it runs under the one GIL. At 0.9 of the
    # ceiling the same frame size needs this many cores of it: above 1, one process cannot.
    outside_us = statistics.median(
        (r.server_cores - r.step_ort_ms / r.step_period_ms) / r.frames_per_s * 1e6 for r in results
    )
    frames_per_char = statistics.median(r.frames_per_s / r.chars_per_s for r in results)
    client_us = statistics.median(r.client_cores / r.frames_per_s * 1e6 for r in results)
    return {
        "settings": spec,
        "chars_per_s": rate,
        "vs_ceiling": rate / ceiling,
        "p99_gap_ms": p99,
        "p99_gap_vs_step": p99 / step_ms,
        "server_cores": statistics.median(r.server_cores for r in results),
        "client_cores": statistics.median(r.client_cores for r in results),
        "step_period_ms": statistics.median(r.step_period_ms for r in results),
        "step_ort_ms": statistics.median(r.step_ort_ms for r in results),
        "chars_per_frame": 1 / frames_per_char,
        "server_us_per_frame": outside_us,
        "client_us_per_frame": client_us,
        "python_cores_at_target": outside_us * frames_per_char * TARGET * ceiling / 1e6,
        # onnxruntime busy TARGET of the time at the ceiling's step, plus the server's other
        # work and the clients' at the frames that rate makes: against the machine's cores.
        "cores_at_target": TARGET + (outside_us + client_us) * frames_per_char * TARGET * ceiling / 1e6,
    }


HEADERS = [
    "settings",
    "chars/s",
    "vs ceiling",
    "p99 gap ms",
    "p99 gap / step",
    "server cores",
    "client cores",
    "step every ms",
    "of it onnxruntime ms",
    "chars per frame",
    "server us/frame outside onnxruntime",
    "client us/frame",
    f"server Python cores needed at {TARGET}",
    f"all cores needed at {TARGET}",
]


def main() -> None:
    args = parse_args()
    rounds = measure(args)
    ceiling = statistics.median(rounds.ceilings)
    step_ms = args.streams / ceiling * 1e3
    rows = [row(spec, results, ceiling, step_ms) for spec, results in rounds.runs.items()]
    scheduler_rate = statistics.median(rounds.alone)
    print(
        f"{args.streams} WebSocket streams, bundled model {args.variant}; ceiling at batch {args.streams}: "
        f"{ceiling:,.0f} chars/s"
        f"; clients at nice {args.client_nice}"
    )
    print(
        f"the scheduler alone (in process, no server): {scheduler_rate:,.0f} chars/s = "
        f"{scheduler_rate / ceiling:.2f} of the ceiling"
    )
    print(f"(one step of {args.streams} every {step_ms:.2f} ms); targets: >= {TARGET} of it, p99 gap <= 2 steps")
    print(table(HEADERS, [list(r.values()) for r in rows]))
    path = write_results(
        args.name,
        {
            "variant": args.variant,
            "ceiling": ceiling,
            "ceiling_step_ms": step_ms,
            "scheduler_alone": scheduler_rate,
            "client_nice": args.client_nice,
            "streams": args.streams,
            "rows": rows,
            "rounds": args.rounds,
        },
    )
    print(f"this machine has {os.cpu_count()} cores; one process's Python runs on at most one (the GIL)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

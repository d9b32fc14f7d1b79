"""Load past the usual benchmark sizes: hundreds to a thousand concurrent streams, and thousands of
idle WebSocket connections held beside 64 active streams, on one worker and on two.

    python -m benchmarks.load                                   # 256 and 1,024 streams, 10,000 idle
    python -m benchmarks.load --streams 256 --idle 2000 --workers 1

For each configuration it reports errors, first-character p50 and p99, inter-character p99, the
aggregate chars/s, and the server's RSS and open file descriptors (the supervisor and its workers
together). The idle run opens the idle connections first (a handshake each, then nothing), runs 64
active streams beside them, and compares those streams with 64 run alone in the same server: the
ratio says whether idle connections slow the active ones; RSS per idle connection and per session
say what each costs. Two workers share sessions through a real redis-server on loopback.

The clients run in this process, on the same two cores as the server: at a thousand streams they
take a large share of the CPU, so the chars/s here is a floor for a server whose clients are remote.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import tempfile
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvloop

from benchmarks import ws_client
from benchmarks.common import ServerProcess, start_charstream, table, write_results
from tests.redis_server import RedisServer

ACTIVE_BESIDE_IDLE = 64
SESSIONS_FOR_MEMORY = 2000


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else 0.0


async def _streams(port: int, count: int, chars: int) -> tuple[list[tuple[float, list[float]]], Counter[str], float]:
    """`count` concurrent WebSocket generations: their (start, arrivals), the errors by kind, the wall time."""
    errors: Counter[str] = Counter()

    async def one(seed: int) -> tuple[float, list[float]] | None:
        request: dict[str, object] = {"type": "generate", "prompt": "ROMEO:", "max_new_chars": chars, "seed": seed}
        try:
            result = await ws_client.generate("127.0.0.1", port, request)
        except (OSError, RuntimeError, ConnectionError) as exc:
            errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
            return None
        if result.final is None or result.final.get("type") != "done":
            errors[str(result.final.get("message") if result.final else None)[:200]] += 1
            return None
        return result.t0, result.arrivals

    t0 = time.perf_counter()
    outcomes = await asyncio.gather(*(one(i) for i in range(count)))
    wall = time.perf_counter() - t0
    return [o for o in outcomes if o is not None], errors, wall


def summarize(results: list[tuple[float, list[float]]], errors: Counter[str], wall: float) -> dict[str, Any]:
    ttfc = [arrivals[0] - t0 for t0, arrivals in results if arrivals]
    gaps = [b - a for _, arrivals in results for a, b in pairwise(arrivals)]
    return {
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "chars_per_s": sum(len(a) for _, a in results) / wall,
        "ttfc_p50_ms": statistics.median(ttfc) * 1e3 if ttfc else 0.0,
        "ttfc_p99_ms": _percentile(ttfc, 99),
        "inter_char_p99_ms": _percentile(gaps, 99),
    }


def run_streams(server: ServerProcess, count: int, chars: int) -> dict[str, Any]:
    results, errors, wall = uvloop.run(_streams(server.port, count, chars))
    out = summarize(results, errors, wall)
    out.update(server_rss_mb=server.rss() / 2**20, server_fds=server.fds())
    return out


async def _with_idle(server: ServerProcess, idle: int, chars: int) -> dict[str, Any]:
    """Open `idle` WebSocket connections, run the active streams beside them, then close them."""
    rss0, fds0 = server.rss(), server.fds()
    opened: list[Any] = []
    failed = 0
    from websockets.asyncio.client import connect

    async def open_one() -> None:
        nonlocal failed
        try:
            opened.append(await connect(f"ws://127.0.0.1:{server.port}/v1/stream", ping_interval=None))
        except Exception:  # a refused or failed handshake, whatever the exception: counted
            failed += 1

    for start in range(0, idle, 500):  # in waves: a burst of 10,000 handshakes is its own test
        await asyncio.gather(*(open_one() for _ in range(min(500, idle - start))))
    held_rss, held_fds = server.rss(), server.fds()
    results, errors, wall = await _streams(server.port, ACTIVE_BESIDE_IDLE, chars)
    still_open = sum(1 for ws in opened if ws.state.name == "OPEN")
    await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    out = summarize(results, errors, wall)
    out.update(
        server_rss_mb=held_rss / 2**20,
        server_fds=held_fds,
        idle_opened=len(opened),
        idle_refused=failed,
        idle_dropped=len(opened) - still_open,
        rss_per_idle_kib=(held_rss - rss0) / max(1, len(opened)) / 1024,
        fds_held=held_fds - fds0,
    )
    return out


def session_memory(server: ServerProcess, sessions: int) -> dict[str, float]:
    """What a session held by the server costs, in bytes: RSS (in the server; in Redis with workers)
    and the server's own account of a record (sessions made with a short prompt)."""
    with httpx.Client(base_url=server.base, timeout=60) as client:
        client.post("/v1/sessions", json={"prompt": "warm"}).raise_for_status()
        before = server.rss()
        for _ in range(sessions):
            client.post("/v1/sessions", json={"prompt": "A"}).raise_for_status()
        rss = (server.rss() - before) / sessions
        metrics = client.get("/metrics").text.splitlines()
    held = next(float(line.split()[1]) for line in metrics if line.startswith("charstream_sessions "))
    accounted = next(float(line.split()[1]) for line in metrics if line.startswith("charstream_session_memory_bytes "))
    return {"rss_per_session_bytes": rss, "accounted_per_session_bytes": accounted / max(1.0, held)}


def main() -> None:
    # One run read top to bottom (arguments, each configuration's runs, the table, the results file):
    # the configurations share the run's Redis server and numbers, so they stay in one function.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="256,1024", help="concurrent stream counts")
    parser.add_argument("--idle", type=int, default=10_000, help="idle WebSocket connections beside 64 active")
    parser.add_argument("--workers", default="1,2", help="worker counts (more than one shares Redis)")
    parser.add_argument("--chars", type=int, default=400, help="characters per stream")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--name", default="load")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the clients hold every connection too
    counts = [int(n) for n in args.streams.split(",")]
    rows: list[list[Any]] = []
    report: dict[str, Any] = {"chars_per_stream": args.chars, "idle": args.idle, "configurations": {}}
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp)).start()
        try:
            for workers in (int(w) for w in args.workers.split(",")):
                env = {
                    "CHARSTREAM_WORKERS": str(workers),
                    "CHARSTREAM_MAX_CONNECTIONS": str(args.idle + 2 * max(counts)),
                }
                if workers > 1:
                    env["CHARSTREAM_SESSION_STORE"] = redis.url
                server = start_charstream(args.port, **env)
                try:
                    run_streams(server, 16, args.chars)  # warm-up: first connections pay for imports
                    # Before the big runs: memory they free would be reused by new sessions, unseen in RSS.
                    config: dict[str, Any] = {"streams": {}, **session_memory(server, SESSIONS_FOR_MEMORY)}
                    for count in counts:
                        config["streams"][count] = result = run_streams(server, count, args.chars)
                        rows.append([workers, f"{count} streams", *_row(result)])
                    alone = run_streams(server, ACTIVE_BESIDE_IDLE, args.chars)
                    beside = uvloop.run(_with_idle(server, args.idle, args.chars))
                    beside["active_vs_alone"] = beside["chars_per_s"] / alone["chars_per_s"]
                    config.update(active_alone=alone, active_beside_idle=beside)
                    rows.append([workers, f"{ACTIVE_BESIDE_IDLE} alone", *_row(alone)])
                    rows.append([workers, f"{ACTIVE_BESIDE_IDLE} + {args.idle} idle", *_row(beside)])
                    report["configurations"][workers] = config
                finally:
                    server.stop()
        finally:
            redis.stop()
    print(
        table(
            ["workers", "load", "errors", "chars/s", "ttfc p50 ms", "ttfc p99 ms", "gap p99 ms", "RSS MiB", "fds"],
            rows,
        )
    )
    for workers, config in report["configurations"].items():
        for count, result in config["streams"].items():
            if result["error_kinds"]:
                print(f"{workers} worker(s), {count} streams, errors: {result['error_kinds']}")
        beside = config["active_beside_idle"]
        print(
            f"{workers} worker(s): {beside['idle_opened']} idle held ({beside['idle_refused']} refused, "
            f"{beside['idle_dropped']} dropped), {beside['rss_per_idle_kib']:.1f} KiB RSS each; active streams at "
            f"{beside['active_vs_alone']:.2f} of their rate alone; a session "
            f"{config['rss_per_session_bytes'] / 1024:.1f} KiB of RSS "
            f"({config['accounted_per_session_bytes'] / 1024:.1f} KiB accounted)"
        )
    print(f"results: {write_results(args.name, report)}")


def _row(result: dict[str, Any]) -> list[Any]:
    return [
        int(result["errors"]),
        result["chars_per_s"],
        result["ttfc_p50_ms"],
        result["ttfc_p99_ms"],
        result["inter_char_p99_ms"],
        result.get("server_rss_mb", 0.0),
        int(result.get("server_fds", 0)),
    ]


if __name__ == "__main__":
    main()

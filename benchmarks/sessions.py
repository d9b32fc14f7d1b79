"""Shared sessions: what keeping a session in Redis costs, measured side by side in one run.

  continue   time to first character continuing a session with 10,000 characters of history,
             from the memory store and from Redis (interleaved rounds, p50/p99), against
             re-reading the same history statelessly
  memory     Redis memory per session record for the bundled model
  churn      100,000 sessions created through the server, stored, and expired by Redis: errors
  workers    aggregate chars/s at 64 WebSocket streams with 1 and with 2 (or --workers) server
             processes on one port, sessions in Redis, with the servers' CPU

A real redis-server (Debian's package) runs on loopback as a child of this script.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import uvloop

from benchmarks import ws_client
from benchmarks.common import REPO, start_charstream, table, write_results
from tests.redis_server import RedisServer

HISTORY_CHARS = 10_000
CONTINUES = 200
CHURN_SESSIONS = 100_000
CHURN_TTL_S = 20
STREAMS = 64
CHARS_PER_STREAM = 400


def history_text() -> str:
    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return text[:HISTORY_CHARS]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def continue_times(base: str, rounds: int) -> dict[str, list[float]]:
    """Each round: continue a 10k-history session by one character, and re-read the history statelessly."""
    history = history_text()
    out: dict[str, list[float]] = {"continue": [], "reread": []}
    with httpx.Client(base_url=base, timeout=60) as c:
        sid = c.post("/v1/sessions", json={"prompt": history, "seed": 1}).json()["id"]
        for _ in range(rounds):
            t0 = time.perf_counter()
            r = c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 1})
            out["continue"].append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
        for _ in range(max(3, rounds // 20)):
            t0 = time.perf_counter()
            r = c.post("/v1/generate", json={"prompt": history, "max_new_chars": 1})
            out["reread"].append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    return out


def measure_continue(redis_url: str, port: int) -> dict[str, Any]:
    servers = {
        "memory": start_charstream(port),
        "redis": start_charstream(port + 1, CHARSTREAM_SESSION_STORE=redis_url),
    }
    samples: dict[str, list[float]] = {"memory": [], "redis": [], "reread": []}
    try:
        for server in servers.values():  # warm-up
            continue_times(server.base, 10)
        for _ in range(4):  # interleaved rounds: drift hits both alike
            for name, server in servers.items():
                got = continue_times(server.base, CONTINUES // 4)
                samples[name] += got["continue"]
                if name == "memory":
                    samples["reread"] += got["reread"]
    finally:
        for server in servers.values():
            server.stop()
    summary = {
        name: {"p50_ms": percentile(v, 50) * 1e3, "p99_ms": percentile(v, 99) * 1e3, "n": len(v)}
        for name, v in samples.items()
    }
    return {
        **summary,
        "redis_vs_memory_p50": summary["redis"]["p50_ms"] / summary["memory"]["p50_ms"],
        "redis_vs_memory_p99": summary["redis"]["p99_ms"] / summary["memory"]["p99_ms"],
        "redis_vs_reread_p50": summary["redis"]["p50_ms"] / summary["reread"]["p50_ms"],
    }


def measure_memory(redis_server: RedisServer, port: int) -> dict[str, Any]:
    client = redis_server.client()
    client.flushall()
    server = start_charstream(port, CHARSTREAM_SESSION_STORE=redis_server.url)
    try:
        before = int(client.info("memory")["used_memory"])
        n = 2000
        with httpx.Client(base_url=server.base, timeout=60) as c:
            for _ in range(n):
                sid = c.post("/v1/sessions", json={"prompt": "ROMEO:"}).json()["id"]
        after = int(client.info("memory")["used_memory"])
        record = client.memory_usage(f"charstream:{{{sid}}}:rec") or 0
        length = client.strlen(f"charstream:{{{sid}}}:rec")
    finally:
        server.stop()
        client.close()
    return {
        "sessions": n,
        "record_bytes": length,
        "memory_usage_per_record": record,
        "used_per_session": (after - before) / n,
    }


async def _churn(base: str, n: int, concurrency: int) -> dict[str, int]:
    errors: dict[str, int] = {}
    queue = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as c:

        async def worker() -> None:
            for _ in queue:
                try:
                    r = await c.post("/v1/sessions", json={})
                    if r.status_code != 201:
                        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


def measure_churn(redis_server: RedisServer, port: int) -> dict[str, Any]:
    client = redis_server.client()
    client.flushall()
    server = start_charstream(
        port,
        CHARSTREAM_SESSION_STORE=redis_server.url,
        CHARSTREAM_SESSION_TTL_S=str(CHURN_TTL_S),
        CHARSTREAM_MAX_SESSIONS=str(CHURN_SESSIONS * 2),
    )
    try:
        t0 = time.perf_counter()
        errors = uvloop.run(_churn(server.base, CHURN_SESSIONS, 32))
        created_s = time.perf_counter() - t0
        stored = client.dbsize()
        deadline = time.monotonic() + CHURN_TTL_S + 60
        while client.dbsize() > 1 and time.monotonic() < deadline:  # the cap's index stays, emptied
            time.sleep(1)
        left = client.dbsize()
        with httpx.Client(base_url=server.base) as c:  # the server trims its index as it sweeps
            sessions_metric = next(
                float(line.split()[1])
                for line in c.get("/metrics").text.splitlines()
                if line.startswith("charstream_sessions ")
            )
    finally:
        server.stop()
        client.close()
    return {
        "sessions": CHURN_SESSIONS,
        "errors": errors,
        "created_per_s": CHURN_SESSIONS / created_s,
        "keys_after_create": stored,
        "keys_after_expiry": left,
        "sessions_metric_after_expiry": sessions_metric,
    }


async def _streams(port: int, seeds: list[int]) -> int:
    requests = [{"type": "generate", "prompt": "ROMEO:", "max_new_chars": CHARS_PER_STREAM, "seed": i} for i in seeds]
    results = await asyncio.gather(*(ws_client.generate("127.0.0.1", port, r) for r in requests))
    return sum(len(r.arrivals) for r in results)


def _client_share(port: int, seeds: list[int]) -> int:
    return uvloop.run(_streams(port, seeds))


def run_streams(port: int, pool: tuple[ProcessPoolExecutor, int] | None) -> int:
    """64 streams at once: in this process, or split over the pool's client processes (a many-core
    machine's server outruns one client process)."""
    seeds = list(range(STREAMS))
    if pool is None:
        return _client_share(port, seeds)
    executor, procs = pool
    shares = [seeds[i::procs] for i in range(procs)]
    return sum(executor.map(_client_share, [port] * procs, shares))


def measure_workers(
    redis_url: str, port: int, counts: list[int], rounds: int, pool: tuple[ProcessPoolExecutor, int] | None
) -> list[dict[str, Any]]:
    rows = []
    servers = {
        n: start_charstream(port + i, CHARSTREAM_SESSION_STORE=redis_url, CHARSTREAM_WORKERS=str(n))
        for i, n in enumerate(counts)
    }
    runs: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}
    try:
        time.sleep(2)  # every worker up
        for server in servers.values():
            run_streams(server.port, pool)  # warm-up
        for _ in range(rounds):
            for n, server in servers.items():
                cpu0, t0 = server.cpu_seconds(), time.perf_counter()
                chars = run_streams(server.port, pool)
                wall = time.perf_counter() - t0
                runs[n].append((chars / wall, (server.cpu_seconds() - cpu0) / wall))
    finally:
        for server in servers.values():
            server.stop()
    for n in counts:
        rows.append(
            {
                "workers": n,
                "chars_per_s": statistics.median(r[0] for r in runs[n]),
                "server_cpu": statistics.median(r[1] for r in runs[n]),
            }
        )
    for row in rows:
        row["vs_1_worker"] = row["chars_per_s"] / rows[0]["chars_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8811)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare at 64 streams")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-churn", action="store_true")
    parser.add_argument("--name", default="sessions", help="results file name")
    parser.add_argument("--client-procs", type=int, default=1, help="client processes for the worker runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = RedisServer(Path(tmp)).start()
        try:
            cont = measure_continue(redis_server.url, args.port)
            print(f"continue a session with {HISTORY_CHARS:,} characters of history (time to first character)")
            print(
                table(
                    ["store", "p50 ms", "p99 ms", "n"],
                    [[k, v["p50_ms"], v["p99_ms"], v["n"]] for k, v in cont.items() if isinstance(v, dict)],
                )
            )
            print(
                f"redis vs memory: p50 {cont['redis_vs_memory_p50']:.2f}x, p99 {cont['redis_vs_memory_p99']:.2f}x "
                f"(target <= 1.5x); redis vs re-reading: {cont['redis_vs_reread_p50']:.3f}x (target <= 0.1x)"
            )
            mem = measure_memory(redis_server, args.port + 10)
            record, usage, growth = mem["record_bytes"], mem["memory_usage_per_record"], mem["used_per_session"]
            print(f"\nRedis memory per session: record {record:,} bytes, MEMORY USAGE {usage:,}, growth {growth:,.0f}")
            churn = None
            if not args.skip_churn:
                churn = measure_churn(redis_server, args.port + 20)
                rate, errors = churn["created_per_s"], churn["errors"] or 0
                before, after = churn["keys_after_create"], churn["keys_after_expiry"]
                print(
                    f"\n{CHURN_SESSIONS:,} sessions made ({rate:,.0f}/s), errors {errors}, keys {before:,} -> {after}"
                )
            counts = [int(x) for x in args.workers.split(",")]
            executor = ProcessPoolExecutor(args.client_procs) if args.client_procs > 1 else None
            try:
                pool = None if executor is None else (executor, args.client_procs)
                workers = measure_workers(redis_server.url, args.port + 30, counts, args.rounds, pool)
            finally:
                if executor is not None:
                    executor.shutdown()
            print(f"\n{STREAMS} WebSocket streams x {CHARS_PER_STREAM} chars, sessions in Redis")
            print(
                table(["workers", "chars/s", "server CPU (cores)", "vs 1 worker"], [list(r.values()) for r in workers])
            )
        finally:
            redis_server.stop()
    path = write_results(
        args.name,
        {"continue": cont, "memory": mem, "churn": churn, "workers": workers, "cpus": psutil.cpu_count()},
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""Redis Sentinel failover with real processes on loopback: what clients see and what is lost.

A primary, two replicas and three sentinels (down-after 1000 ms); one charstream server
(`python -m service`, the bundled model) with CHARSTREAM_SESSION_STORE=redis+sentinel://...;
50 clients each continue their own session without pause while the primary is SIGKILLed. Per
run: requests answered and refused (by status), seconds from the kill until the sentinels name a
new primary and until every client is answered again, and sessions whose stored history is behind
the last done event their client saw (lost writes). Each mode (no WAIT, WAIT 1) runs `--runs`
times. Then the cost of WAIT: lease and save latency of one session through the sentinels.

    python -m benchmarks.failover [--runs 2] [--clients 50]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import SERVE, ServerProcess, free_port, table, write_results
from service.sessions.redis_store import RedisSessionStore
from service.sessions.store import Session
from tests.redis_sentinel import SentinelGroup, wait_for

BODY = {"max_new_chars": 4, "temperature": 0.8}


async def history(http: httpx.AsyncClient, sid: str) -> int:
    while True:
        r = await http.get(f"/v1/sessions/{sid}")
        if r.status_code == 200:
            return int(r.json()["history_chars"])
        await asyncio.sleep(0.05)


async def one_run(base_url: str, group: SentinelGroup, clients: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients + 10, keepalive_expiry=1)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as http:
        sids = []
        for _ in range(clients):
            r = await http.post("/v1/sessions", json={"prompt": "ROMEO:"})
            r.raise_for_status()
            sids.append(r.json()["id"])
        first = await history(http, sids[0])
        (await http.post(f"/v1/sessions/{sids[0]}/generate", json=BODY)).raise_for_status()
        step = await history(http, sids[0]) - first
        seen = {sid: await history(http, sid) for sid in sids}
        answered_after: dict[str, int] = dict.fromkeys(sids, 0)
        statuses: dict[int, int] = {}
        stop, switched = asyncio.Event(), asyncio.Event()

        async def client(sid: str) -> None:
            while not stop.is_set():
                r = await http.post(f"/v1/sessions/{sid}/generate", json=BODY)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    seen[sid] += step
                    answered_after[sid] += switched.is_set()
                    continue
                if r.status_code == 503:  # the request may have been saved before its answer was lost
                    seen[sid] = max(seen[sid], await history(http, sid))
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(client(sid)) for sid in sids]
        await asyncio.sleep(1.0)  # traffic before the kill
        old = group.primary()
        killed = time.monotonic()
        group.kill(old)
        await asyncio.to_thread(wait_for, lambda: group.primary() != old, 60, "a promotion")
        promoted = time.monotonic() - killed
        switched.set()
        await asyncio.to_thread(wait_for, lambda: all(answered_after.values()), 60, "every client answered")
        recovered = time.monotonic() - killed
        stop.set()
        await asyncio.gather(*tasks)
        stored = {sid: await history(http, sid) for sid in sids}
    return {
        "answered": statuses.get(200, 0),
        "refused": {str(k): v for k, v in sorted(statuses.items()) if k != 200},
        "promoted_s": round(promoted, 2),
        "recovered_s": round(recovered, 2),
        "sessions_behind": sum(stored[sid] < seen[sid] for sid in sids),
    }


def failovers(folder: Path, wait: int, runs: int, clients: int) -> list[dict[str, Any]]:
    results = []
    for run in range(runs):
        group = SentinelGroup(folder / f"w{wait}r{run}", replicas=2).start()
        try:
            port = free_port()
            env = {
                "CHARSTREAM_HOST": "127.0.0.1",
                "CHARSTREAM_PORT": str(port),
                "CHARSTREAM_SESSION_STORE": group.url,
                "CHARSTREAM_REDIS_WAIT_REPLICAS": str(wait),
                "CHARSTREAM_LEASE_TTL_S": "1",
                "CHARSTREAM_LOG_JSON": "false",
            }
            with ServerProcess(SERVE, port, env=env, log=folder / f"server-w{wait}r{run}.log") as server:
                results.append({"wait_replicas": wait, **asyncio.run(one_run(server.base, group, clients))})
        finally:
            group.stop()
    return results


def ms(seconds: list[float], q: int) -> float:
    return round(float(np.percentile(seconds, q)) * 1e3, 3)


def wait_cost(folder: Path, cycles: int = 1000) -> list[dict[str, Any]]:
    group = SentinelGroup(folder / "cost", replicas=2).start()
    rows = []
    try:
        for wait in (0, 1, 2):

            async def measure(wait: int = wait) -> dict[str, Any]:
                store = RedisSessionStore(
                    group.url, ttl_s=60, max_sessions=10, lease_ttl_s=5, models={"m": "a" * 64},
                    prefix=f"cost{wait}", wait_replicas=wait,
                )  # fmt: skip
                s = Session.fresh("m", (2, 512), 2, 1)  # the bundled model's state
                s.logits = np.zeros(65, np.float32)
                await store.create(s)
                lease_s, save_s = [], []
                for _ in range(cycles):
                    t0 = time.perf_counter()
                    got, lease = await store.lease(s.id)
                    t1 = time.perf_counter()
                    await store.save(got, lease)
                    lease_s.append(t1 - t0)
                    save_s.append(time.perf_counter() - t1)
                await store.close()
                return {"wait_replicas": wait, "lease_p50_ms": ms(lease_s, 50), "lease_p99_ms": ms(lease_s, 99),
                        "save_p50_ms": ms(save_s, 50), "save_p99_ms": ms(save_s, 99)}  # fmt: skip

            rows.append(asyncio.run(measure()))
    finally:
        group.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = [r for wait in (0, 1) for r in failovers(folder, wait, args.runs, args.clients)]
        cost = wait_cost(folder)
    print(
        table(
            ["WAIT", "answered", "refused", "promoted s", "all answered again s", "sessions behind"],
            [
                [
                    r["wait_replicas"],
                    r["answered"],
                    r["refused"],
                    r["promoted_s"],
                    r["recovered_s"],
                    r["sessions_behind"],
                ]
                for r in runs
            ],
        )
    )
    print()
    print(table(list(cost[0]), [list(row.values()) for row in cost]))
    path = write_results("failover", {"clients": args.clients, "failovers": runs, "wait_cost": cost})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

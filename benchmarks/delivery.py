"""Delivery settings side by side: 64 WebSocket streams against servers that differ in one
setting each, in interleaved rounds, set against the in-process ceiling measured in the same
rounds. Reports aggregate chars/s, its ratio to the ceiling at batch 64, the p99 gap between
characters and its ratio to the ceiling's step time at batch 64 (the issue's two targets).

    python -m benchmarks.delivery --variant int8 \\
        default CHARSTREAM_SWITCH_INTERVAL_US=200 CHARSTREAM_STREAM_INTERVAL=2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from itertools import pairwise
from typing import Any

import numpy as np
import uvloop

from benchmarks import serving, ws_client
from benchmarks.common import table, write_results

STREAMS = 64


async def _streams(port: int, chars: int) -> tuple[float, list[float]]:
    requests = [{"type": "generate", "prompt": "ROMEO:", "max_new_chars": chars, "seed": i} for i in range(STREAMS)]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(ws_client.generate("127.0.0.1", port, r) for r in requests))
    wall = time.perf_counter() - t0
    gaps = [b - a for r in results for a, b in pairwise(r.arrivals)]
    return sum(len(r.arrivals) for r in results) / wall, gaps


def parse(spec: str) -> dict[str, str]:
    if spec == "default":
        return {}
    return dict(item.split("=", 1) for item in spec.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help="'default' or NAME=VALUE[,NAME=VALUE] per server")
    parser.add_argument("--variant", default="fp32", choices=["fp32", "int8"])
    parser.add_argument("--chars", type=int, default=400, help="characters per stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8861)
    parser.add_argument("--name", default="delivery", help="results file name")
    args = parser.parse_args()
    serving.VARIANT = args.variant
    servers = {spec: serving.ServerProcess(args.port + i, **parse(spec)) for i, spec in enumerate(args.settings)}
    runs: dict[str, list[tuple[float, list[float]]]] = {spec: [] for spec in servers}
    ceilings: list[float] = []
    try:
        for server in servers.values():
            uvloop.run(_streams(server.port, 100))  # warm-up
        for _ in range(args.rounds):
            ceilings.append(serving.ceiling(STREAMS, 300))
            for spec, server in servers.items():
                runs[spec].append(uvloop.run(_streams(server.port, args.chars)))
    finally:
        for server in servers.values():
            server.stop()
    ceiling = statistics.median(ceilings)
    step_ms = STREAMS / ceiling * 1e3
    rows: list[dict[str, Any]] = []
    for spec, results in runs.items():
        rate = statistics.median(r[0] for r in results)
        p99 = statistics.median(float(np.percentile(r[1], 99)) for r in results) * 1e3
        rows.append(
            {
                "settings": spec,
                "chars_per_s": rate,
                "vs_ceiling": rate / ceiling,
                "p99_gap_ms": p99,
                "p99_gap_vs_step": p99 / step_ms,
            }
        )
    print(
        f"{STREAMS} WebSocket streams, bundled model {args.variant}; ceiling at batch {STREAMS}: {ceiling:,.0f} chars/s"
    )
    print(f"(one step of {STREAMS} every {step_ms:.2f} ms); targets: >= 0.9 of the ceiling, p99 gap <= 2 steps")
    print(
        table(["settings", "chars/s", "vs ceiling", "p99 gap ms", "p99 gap / step"], [list(r.values()) for r in rows])
    )
    path = write_results(
        args.name,
        {"variant": args.variant, "ceiling": ceiling, "ceiling_step_ms": step_ms, "rows": rows, "rounds": args.rounds},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

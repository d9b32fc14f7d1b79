"""What asking for unit activations costs: 64 WebSocket streams on one server, plain and with the
values of 8 units per character, in interleaved rounds (median). Target: <= 10% fewer chars/s.

    python -m benchmarks.activations_cost
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import uvloop

from benchmarks import ws_client
from benchmarks.common import start_charstream, table, write_results

STREAMS = 64
UNITS = [3, 17, 64, 101, 222, 301, 400, 511]


async def _streams(port: int, chars: int, extra: dict[str, Any]) -> float:
    requests = [
        {"type": "generate", "prompt": "ROMEO:", "max_new_chars": chars, "seed": i, **extra} for i in range(STREAMS)
    ]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(ws_client.generate("127.0.0.1", port, r) for r in requests))
    wall = time.perf_counter() - t0
    for r in results:
        if r.final is None or r.final.get("type") != "done":
            raise RuntimeError(f"a stream ended with {r.final}")
    return sum(len(r.arrivals) for r in results) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8871)
    args = parser.parse_args()
    variants: dict[str, dict[str, Any]] = {
        "plain": {},
        "8 units (layer 1 c)": {"activations": {"layer": 1, "state": "c", "units": UNITS}},
        "8 units + top 5": {"activations": {"layer": 1, "state": "c", "units": UNITS}, "top_logprobs": 5},
    }
    server = start_charstream(args.port)
    runs: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for extra in variants.values():
            uvloop.run(_streams(args.port, 100, extra))  # warm-up
        for _ in range(args.rounds):
            for name, extra in variants.items():
                runs[name].append(uvloop.run(_streams(args.port, args.chars, extra)))
    finally:
        server.stop()
    plain = statistics.median(runs["plain"])
    rows = [[name, statistics.median(r), statistics.median(r) / plain] for name, r in runs.items()]
    print(f"{STREAMS} WebSocket streams, bundled model; target: activations of 8 units cost <= 10%")
    print(table(["request", "chars/s", "vs plain"], rows))
    path = write_results(
        "activations_cost",
        {
            "streams": STREAMS,
            "units": UNITS,
            "rows": [dict(zip(["request", "chars_per_s", "vs_plain"], r, strict=True)) for r in rows],
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

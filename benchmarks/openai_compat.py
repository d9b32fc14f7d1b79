"""Streaming through OpenAI's /v1/completions against the native SSE route, side by side in one run.

The same server, the bundled model, the same clients (one shared httpx client, frames parsed
as JSON): at each level, N concurrent streams of the same length through `POST /v1/generate`
with `stream: true` and through `POST /v1/completions` with `stream: true`, in interleaved
rounds, the median kept. The target: completions cost no more than 10% in aggregate chars/s
at 64 streams (ratio >= 0.9).

    python -m benchmarks.openai_compat      # results: benchmarks/results/openai.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import httpx
import uvloop

from benchmarks.common import MODEL, VARIANT, ServerProcess, own_cpu_seconds, start_charstream, table, write_results
from benchmarks.serving import sse_stream, summarize

TARGET = 0.9


async def completion_stream(
    client: httpx.AsyncClient, chars: int, seed: int, model: str = MODEL
) -> tuple[float, list[float]]:
    """Time to first char and every char's arrival, for one streamed completion."""
    body = {"model": model, "prompt": "ROMEO:", "max_tokens": chars, "seed": seed, "stream": True}
    t0 = time.perf_counter()
    arrivals: list[float] = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                choices = json.loads(line[6:])["choices"]
                if choices:
                    arrivals.extend([now] * len(choices[0]["text"]))
    return t0, arrivals


def run_load(server: ServerProcess, route: str, streams: int, chars: int) -> dict[str, float]:
    chars = max(chars, 8000 // streams)  # a level lasts long enough to measure

    async def go() -> tuple[list[tuple[float, list[float]]], float]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=server.base, timeout=300, limits=limits) as client:
            one = completion_stream if route == "completions" else sse_stream
            t0 = time.perf_counter()
            res = await asyncio.gather(*(one(client, chars, i) for i in range(streams)))
            return list(res), time.perf_counter() - t0

    cpu0, client0 = server.cpu_seconds(), own_cpu_seconds()
    results, wall = uvloop.run(go())
    out = summarize(results, wall)
    expected = streams * chars
    got = sum(len(a) for _, a in results)
    if got != expected:
        raise RuntimeError(f"{route}: {got} characters arrived, {expected} were asked for")
    out["server_cpu_pct"] = 100 * (server.cpu_seconds() - cpu0) / wall
    out["client_cpu_pct"] = 100 * (own_cpu_seconds() - client0) / wall
    out["server_cpu_us_per_char"] = 1e6 * (server.cpu_seconds() - cpu0) / got
    return out


def main() -> None:
    # One run read top to bottom (arguments, the runs side by side, the table, the results file):
    # its steps share the run's servers and numbers, so they stay in one function.
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chars", type=int, default=400, help="characters per stream")
    parser.add_argument("--streams", default="1,8,64", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is kept")
    parser.add_argument("--port", type=int, default=8941)
    args = parser.parse_args()
    levels = [int(x) for x in args.streams.split(",")]
    routes = ("native", "completions")

    server = start_charstream(args.port)
    try:
        for route in routes:  # first connections and steps pay for imports and buffers: not measured
            run_load(server, route, 8, 200)
        runs: dict[str, dict[int, list[dict[str, float]]]] = {r: {n: [] for n in levels} for r in routes}
        for i in range(args.rounds):
            for n in levels:
                # Alternate which route goes first, so neither always meets a warmer or cooler machine.
                for route in routes if i % 2 == 0 else routes[::-1]:
                    runs[route][n].append(run_load(server, route, n, args.chars))
    finally:
        server.stop()

    report: dict[str, Any] = {"model": MODEL, "variant": VARIANT, "rounds": args.rounds, "chars": args.chars}
    for route in routes:
        report[route] = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs[route].items()}
    # The ratio of each round's pair, then the median: the two runs of a pair are seconds apart.
    report["ratio"] = {
        n: statistics.median(
            c["chars_per_s"] / s["chars_per_s"] for c, s in zip(runs["completions"][n], runs["native"][n], strict=True)
        )
        for n in levels
    }
    top = max(levels)
    report["target"] = {"streams": top, "ratio_at_least": TARGET, "met": report["ratio"][top] >= TARGET}

    rows = []
    for n in levels:
        s, c = report["native"][n], report["completions"][n]
        rows.append(
            [
                n,
                s["chars_per_s"],
                c["chars_per_s"],
                report["ratio"][n],
                s["ttfc_p50_ms"],
                c["ttfc_p50_ms"],
                s["server_cpu_us_per_char"],
                c["server_cpu_us_per_char"],
            ]
        )
    print(f"SSE streams, model {MODEL} {VARIANT}: native /v1/generate vs OpenAI /v1/completions ({args.rounds} rounds)")
    print(
        table(
            [
                "streams",
                "native chars/s",
                "completions chars/s",
                "ratio",
                "native ttfc ms",
                "completions ttfc ms",
                "native us/char",
                "completions us/char",
            ],
            rows,
        )
    )
    verdict = "met" if report["target"]["met"] else "NOT met"
    print(f"target: completions / native >= {TARGET} at {top} streams: {report['ratio'][top]:.3f} ({verdict})")
    print(f"results: {write_results('openai', report)}")


if __name__ == "__main__":
    main()

"""Chunked prefill: what a long prompt costs the streams running beside it.

Two parts, side by side in one run, with the bundled model:
  chunks    in-process: one seq=T onnxruntime call at T = 32 .. 4096 (batch 1), its time and the
            cost per character, against a one-character step: how the chunk size trades the stall
            it causes against reading speed
  server    a real server, 8 WebSocket streams generating; then one client sends a 100,000-character
            prompt. The largest gap between characters of the 8 streams while the prompt is read,
            and how long the prompt takes, for the default chunk and with chunking off
            (CHARSTREAM_PREFILL_CHUNK=100000: the whole prompt in one call)
"""

from __future__ import annotations

import argparse
import asyncio
import time
from itertools import pairwise
from typing import Any

import numpy as np
import uvloop

from benchmarks import ws_client
from benchmarks.common import MODEL, REPO, model_file, start_charstream, table, write_results
from service.core import Engine
from service.settings import PREFILL_CHUNK

CHUNKS = (32, 64, 128, 256, 512, 1024, 4096)
STREAMS = 8
PROMPT_CHARS = 100_000
TARGET_GAP_MS = 100.0


def chunk_costs(rounds: int) -> list[dict[str, float]]:
    engine = Engine(model_file("fp32"), threads=1)
    rng = np.random.default_rng(0)
    rows = []
    for t in (1, *CHUNKS):
        tokens = rng.integers(0, engine.info.vocab_size, (1, t))
        state = engine.zero_state(1)
        engine.run(tokens, state)  # warm
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            engine.run(tokens, state)
            times.append(time.perf_counter() - t0)
        best = float(np.median(times))
        rows.append({"chunk": t, "call_ms": best * 1e3, "us_per_char": best / t * 1e6})
    step = rows[0]["us_per_char"]
    for row in rows:
        row["vs_step"] = step / row["us_per_char"]
    return rows[1:]


async def _while_prompt_is_read(port: int, prompt: str) -> dict[str, Any]:
    results = [ws_client.StreamResult() for _ in range(STREAMS)]
    streams = [
        asyncio.create_task(
            ws_client.generate(
                "127.0.0.1",
                port,
                {"type": "generate", "prompt": "ROMEO:", "max_new_chars": 100_000, "seed": i},
                results[i],
            )
        )
        for i in range(STREAMS)
    ]
    await asyncio.sleep(1.5)  # the streams are running at their steady pace
    sent = time.perf_counter()
    long = await ws_client.generate("127.0.0.1", port, {"type": "generate", "prompt": prompt, "max_new_chars": 1})
    read = long.arrivals[0] if long.arrivals else time.perf_counter()
    for task in streams:  # measured: disconnect them
        task.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    gaps: list[float] = []
    for result in results:
        inside = [t for t in result.arrivals if sent <= t <= read]
        # The gap before the first character in the window and after the last count too.
        marks = [sent, *inside, read]
        gaps.extend(b - a for a, b in pairwise(marks))
    before = [b - a for r in results for a, b in pairwise(t for t in r.arrivals if t < sent)]
    return {
        "prompt_read_s": read - sent,
        "max_gap_ms": max(gaps) * 1e3,
        "p99_gap_ms": float(np.percentile(gaps, 99)) * 1e3,
        "chars_during_read": sum(len([t for t in r.arrivals if sent <= t <= read]) for r in results),
        "p50_gap_before_ms": float(np.median(before)) * 1e3,
    }


def server_run(chunk: int, prompt: str, port: int) -> dict[str, Any]:
    server = start_charstream(port, CHARSTREAM_PREFILL_CHUNK=str(chunk), CHARSTREAM_MAX_NEW_CHARS="100000")
    try:
        return {"chunk": chunk, **uvloop.run(_while_prompt_is_read(port, prompt))}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="calls per chunk size (median kept)")
    parser.add_argument("--port", type=int, default=8791)
    args = parser.parse_args()

    costs = chunk_costs(args.rounds)
    print("one seq=T call, batch 1, bundled fp32 model, one thread")
    print(table(["chunk", "call ms", "us/char", "x faster than stepping"], [list(r.values()) for r in costs]))

    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    prompt = (text * (PROMPT_CHARS // len(text) + 1))[:PROMPT_CHARS]
    runs = [server_run(PREFILL_CHUNK, prompt, args.port), server_run(PROMPT_CHARS, prompt, args.port + 1)]
    print(f"\n{STREAMS} WebSocket streams while a {PROMPT_CHARS:,}-character prompt is read (target: gap <= 100 ms)")
    print(
        table(
            ["chunk", "prompt read s", "max gap ms", "p99 gap ms", "chars meanwhile", "p50 gap before ms"],
            [list(r.values()) for r in runs],
        )
    )
    chunked, whole = runs
    path = write_results(
        "prefill_fairness",
        {
            "model": MODEL,
            "chunk_costs": costs,
            "server": runs,
            "default_chunk": PREFILL_CHUNK,
            "max_gap_ms": chunked["max_gap_ms"],
            "max_gap_unchunked_ms": whole["max_gap_ms"],
            "target_gap_ms": TARGET_GAP_MS,
            "met": chunked["max_gap_ms"] <= TARGET_GAP_MS,
            "prompt_read_slowdown": chunked["prompt_read_s"] / whole["prompt_read_s"],
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""Time to the first character of a 10,000-character prompt, read the first time and then again.

A real server (`python -m service`, the bundled model) answers stateless streamed `/v1/generate`
requests. Each round sends a prompt it has not seen (the prompt-state cache misses and the whole
prompt is read) and then the same prompt again (the cache holds the state after it, so nothing
is read). The text of both answers is compared too: the cache must not change it. Target: the
repeat reaches its first character in at most 0.05 of the first request's time.

    python -m benchmarks.prompt_cache [--rounds 5] [--chars 10000] [--variant fp32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import httpx

from benchmarks.common import start_charstream, table, write_results
from tests.utils import SHAKESPEARE


def first_char(client: httpx.Client, prompt: str, seed: int) -> tuple[float, str]:
    """Seconds from sending the request to its first text event, and the whole text."""
    body = {"prompt": prompt, "max_new_chars": 40, "seed": seed, "stream": True}
    t0 = time.perf_counter()
    first: float | None = None
    text = ""
    with client.stream("POST", "/v1/generate", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue  # blank lines between events, and the closing [DONE]
            event = json.loads(line[6:])
            if event.get("text"):
                first = first if first is not None else time.perf_counter() - t0
                text += event["text"]
    assert first is not None, "no text came back"
    return first, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chars", type=int, default=10_000)
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--port", type=int, default=8873)
    args = parser.parse_args()
    corpus = SHAKESPEARE.read_text(encoding="utf-8")
    server = start_charstream(args.port, variant=args.variant)
    firsts: list[float] = []
    repeats: list[float] = []
    same = True
    try:
        with httpx.Client(base_url=server.base, timeout=120) as client:
            first_char(client, corpus[-args.chars :], 0)  # warm-up: the engine's first long read
            for r in range(args.rounds):
                prompt = corpus[r * args.chars : (r + 1) * args.chars]
                cold, text = first_char(client, prompt, r)
                warm, again = first_char(client, prompt, r)
                firsts.append(cold)
                repeats.append(warm)
                same = same and text == again
            metrics = client.get("/metrics").text
    finally:
        server.stop()
    counters = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("charstream_prompt_cache_") and "_created" not in line
    }
    first, repeat = statistics.median(firsts), statistics.median(repeats)
    print(
        table(
            ["prompt chars", "first request (s)", "repeat (s)", "ratio", "same text"],
            [[args.chars, first, repeat, repeat / first, same]],
        )
    )
    results: dict[str, Any] = {
        "variant": args.variant,
        "prompt_chars": args.chars,
        "first_s": firsts,
        "repeat_s": repeats,
        "ratio": repeat / first,
        "same_text": same,
        "metrics": counters,
    }
    print(f"-> {write_results('prompt_cache', results)}")


if __name__ == "__main__":
    main()

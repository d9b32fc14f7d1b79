"""What one hostile request costs everyone else: a 50-character generation's latency and the
server's memory while each attack runs, with the bundled model on a real server.

The attacks (each on the same server, one after another):
  score-context   /v1/score with a 100,000-character context and 1,000 one-character texts (a
                  ~106 KB body): the context is read once and every text starts from its state
  completions-max /v1/completions n=1000, max_tokens=4096, logprobs=20: over the work budget
  completions-edge  the largest completion the default budget admits (n=480 x max_tokens 4096),
                  streamed and cut after --edge-seconds
A victim sends 50-character generations back to back while an attack runs: the table has their
median and worst latency, against the same generation on the idle server, and the server's RSS
before and at its highest.

    python -m benchmarks.abuse [--edge-seconds 20]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from benchmarks.common import MODEL, ServerProcess, free_port, start_charstream, table, write_results

VICTIM = {"prompt": "ROMEO:", "max_new_chars": 50, "temperature": 0.8}
CONTEXT_CHARS = 100_000
TEXTS = 1_000


def victim_latency(base: str) -> float:
    started = time.perf_counter()
    r = httpx.post(f"{base}/v1/generate", json=VICTIM, timeout=120)
    r.raise_for_status()
    return time.perf_counter() - started


def during(server: ServerProcess, attack: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """Run `attack` in a thread; the victim's latencies and the server's highest RSS meanwhile."""
    outcome: dict[str, Any] = {}
    rss_before = server.rss()

    def run() -> None:
        started = time.perf_counter()
        outcome.update(attack(server.base))
        outcome["attack_s"] = time.perf_counter() - started

    thread = threading.Thread(target=run)
    thread.start()
    latencies, peak = [], rss_before
    time.sleep(0.2)  # the attack's body is sent and its work started
    while thread.is_alive():
        latencies.append(victim_latency(server.base))
        peak = max(peak, server.rss())
    thread.join()
    if not latencies:  # refused before the victim could run: measure it once after
        latencies.append(victim_latency(server.base))
    return {
        **outcome,
        "victims": len(latencies),
        "victim_median_s": statistics.median(latencies),
        "victim_max_s": max(latencies),
        "rss_before_mb": rss_before / 2**20,
        "rss_peak_mb": peak / 2**20,
    }


def score_context(base: str) -> dict[str, Any]:
    context = ("Now is the winter of our discontent\n" * (CONTEXT_CHARS // 36 + 1))[:CONTEXT_CHARS]
    body = {"context": context, "texts": ["a"] * TEXTS}
    r = httpx.post(f"{base}/v1/score", json=body, timeout=600)
    return {"status": r.status_code, "body_kb": len(httpx.Request("POST", base, json=body).content) / 1024}


def completions_max(base: str) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": "ROMEO:", "n": 1000, "max_tokens": 4096, "logprobs": 20}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=600)
    return {"status": r.status_code, "error": r.json().get("error", {}).get("code")}


def completions_edge(seconds: float) -> Callable[[str], dict[str, Any]]:
    def attack(base: str) -> dict[str, Any]:
        body = {"model": MODEL, "prompt": "ROMEO:", "n": 480, "max_tokens": 4096, "stream": True}
        chunks, deadline = 0, time.monotonic() + seconds
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                chunks += line.startswith("data:")
                if time.monotonic() > deadline:
                    break  # the client leaves: its choices stop at the next step
            return {"status": r.status_code, "chunks": chunks}

    return attack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edge-seconds", type=float, default=20.0)
    args = parser.parse_args()
    with start_charstream(free_port()) as server:
        for _ in range(3):
            victim_latency(server.base)  # warm
        idle = statistics.median(victim_latency(server.base) for _ in range(7))
        attacks: dict[str, Callable[[str], dict[str, Any]]] = {
            "score-context": score_context,
            "completions-max": completions_max,
            "completions-edge": completions_edge(args.edge_seconds),
        }
        results = {name: during(server, attack) for name, attack in attacks.items()}
    rows = [["idle", "", "", round(idle, 3), round(idle, 3), "", ""]]
    for name, r in results.items():
        rows.append(
            [
                name,
                r["status"],
                round(r["attack_s"], 2),
                round(r["victim_median_s"], 3),
                round(r["victim_max_s"], 3),
                round(r["rss_before_mb"]),
                round(r["rss_peak_mb"]),
            ]
        )
    print(table(["attack", "status", "attack s", "victim median s", "victim max s", "RSS MB", "peak RSS MB"], rows))
    print(f"-> {write_results('abuse', {'idle_victim_s': idle, 'attacks': results})}")


if __name__ == "__main__":
    main()

"""A conversation held three ways, side by side in one run with the bundled model on real servers:
time to the first character and the server's RSS at turn 1, 10 and 100 (10,000 characters of
history by turn 100: each turn is 50 characters of prompt and 50 generated).

  session        POST /v1/sessions/{id}/generate: the server keeps the state
  state token    POST /v1/generate {state, return_state}: the client keeps it, no server session
  resend+cache   POST /v1/generate with the whole history as the prompt, prompt-state cache on
  resend         the same with the cache off (CHARSTREAM_PROMPT_CACHE_BYTES=0): the history read again

    python -m benchmarks.states [--turns 100]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import httpx

from benchmarks.common import ServerProcess, free_port, start_charstream, table, write_results

TURN_CHARS = 50
MEASURED = (1, 10, 100)
LINES = ["\nJULIET: O Romeo, Romeo, wherefore art thou Romeo", "\nROMEO: Shall I hear more, or shall I speak at this"]


def turn_prompt(turn: int) -> str:
    return (LINES[turn % 2] + " " * TURN_CHARS)[:TURN_CHARS]


def first_char(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[float, str, dict[str, Any]]:
    """Seconds to the first text frame, the text, and the final frame."""
    started, first, text, final = time.perf_counter(), None, [], {}
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            frame = json.loads(line[5:])
            if "text" in frame:
                first = first if first is not None else time.perf_counter() - started
                text.append(frame["text"])
            else:
                final = frame
    assert first is not None, "no text came"
    return first, "".join(text), final


def conversation(server: ServerProcess, way: str, turns: int, history: list[str]) -> dict[int, dict[str, float]]:
    """Run `turns` turns `way`; the first character's time and the RSS at the measured turns.
    `history` is the session's transcript (for the resend ways), built by the session way."""
    measured: dict[int, dict[str, float]] = {}
    body: dict[str, Any] = {"max_new_chars": TURN_CHARS, "temperature": 0.8}
    with httpx.Client(base_url=server.base, timeout=300) as c:
        sid = c.post("/v1/sessions", json={"seed": 1}).json()["id"] if way == "session" else None
        state = None
        for turn in range(1, turns + 1):
            prompt = turn_prompt(turn)
            if way == "session":
                seconds, text, _ = first_char(c, f"/v1/sessions/{sid}/generate", {**body, "prompt": prompt})
                history.append(prompt + text)
            elif way == "state token":
                carried: dict[str, Any] = {"state": state} if state else {"seed": 1}
                asked = {**body, "prompt": prompt, "return_state": True, **carried}
                seconds, _, final = first_char(c, "/v1/generate", asked)
                state = final["state"]
            elif way == "resend" and turn not in MEASURED:
                continue  # nothing is kept between requests: only the measured turns need sending
            else:
                whole = "".join(history[: turn - 1]) + prompt
                seconds, _, _ = first_char(c, "/v1/generate", {**body, "prompt": whole})
            if turn in MEASURED:
                measured[turn] = {"first_char_s": seconds, "rss_mb": server.rss() / 2**20}
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=100)
    args = parser.parse_args()
    history: list[str] = []
    results: dict[str, dict[int, dict[str, float]]] = {}
    with start_charstream(free_port()) as server:
        for way in ("session", "state token", "resend+cache"):
            results[way] = conversation(server, way, args.turns, history)
    with start_charstream(free_port(), CHARSTREAM_PROMPT_CACHE_BYTES="0") as server:
        results["resend"] = conversation(server, "resend", args.turns, history)
    turns = [t for t in MEASURED if t <= args.turns]
    rows = [
        [way, *(round(r[t]["first_char_s"] * 1000, 1) for t in turns), *(round(r[t]["rss_mb"]) for t in turns)]
        for way, r in results.items()
    ]
    headers = ["way", *(f"turn {t} first char ms" for t in turns), *(f"turn {t} RSS MB" for t in turns)]
    print(table(headers, rows))
    history_chars = sum(len(h) for h in history)
    print(
        f"-> {write_results('states', {'turn_chars': 2 * TURN_CHARS, 'history_chars': history_chars, 'ways': results})}"
    )


if __name__ == "__main__":
    main()

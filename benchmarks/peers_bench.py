"""charstream against a LitServe peer serving the same .onnx file: same clients, same machine, same run.

Both servers run as their own processes on loopback, side by side, and every measurement is
taken in interleaved rounds with the median kept (this machine's speed drifts within minutes):

  throughput  aggregate chars/s at 1, 8 and 64 concurrent streams over HTTP streaming, both
              with the same httpx client: charstream's SSE route (POST /v1/generate, stream)
              and LitServe's streaming endpoint (POST /predict, one JSON line per character);
              charstream's WebSocket route beside them (benchmarks/ws_client.py), labelled so
  fresh       time to first character for a short prompt, one request at a time
  history     time to first character for a conversation with 10,000 characters of history:
              charstream continues a session that already holds it; the stateless peer reads
              the 10,000 characters again, as it must (charstream re-reading them is shown too)

The peer is `benchmarks/peers/litserve_server.py`, written as a LitServe user would write it.
Idle, it polls its queues (its idle CPU is reported); it is paused while charstream is measured,
so that each server has the machine's two cores to itself and the same load client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import uvloop

from benchmarks import ws_client
from benchmarks.common import (
    REPO,
    SERVE,
    ServerProcess,
    median_of_runs,
    own_cpu_seconds,
    save_figure,
    table,
    write_results,
)

DOCS = REPO / "docs"
HISTORY_CHARS = 10_000
Result = tuple[float, list[float]]  # when the request was sent, and the arrival time of every character


# -- servers, each a process group of its own --------------------------------------------------------


def start_grouped_charstream(models_dir: Path, model: str, port: int) -> ServerProcess:
    """charstream in a process group of its own, as the peer is, with the limits this comparison needs."""
    env = {
        "CHARSTREAM_MODELS_DIR": str(models_dir),
        "CHARSTREAM_DEFAULT_MODEL": model,
        "CHARSTREAM_PORT": str(port),
        "CHARSTREAM_LOG_LEVEL": "warning",
        "CHARSTREAM_MAX_NEW_CHARS": "100000",
        "CHARSTREAM_MAX_PROMPT_CHARS": "100000",
    }
    return ServerProcess(SERVE, port, env=env, own_group=True, ready_timeout_s=120)


def start_peer(model_file: Path, port: int, *options: str) -> ServerProcess:
    """The LitServe peer: a group of its own, as it starts worker processes that stop() must end too."""
    command = [sys.executable, "-m", "benchmarks.peers.litserve_server", str(model_file), "--port", str(port), *options]
    return ServerProcess(command, port, name="litserve", ready_path="/health", own_group=True, ready_timeout_s=120)


# -- clients ---------------------------------------------------------------------------------------


async def sse_stream(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Result:
    """charstream's SSE: `data: {"type": "text", "text": ...}` events until done."""
    t0 = time.perf_counter()
    arrivals: list[float] = []
    async with client.stream("POST", path, json=body | {"stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"text"' in line:
                now = time.perf_counter()
                arrivals.extend([now] * len(json.loads(line[6:])["text"]))
    return t0, arrivals


async def peer_stream(client: httpx.AsyncClient, body: dict[str, Any]) -> Result:
    """LitServe's streaming: one `{"text": ...}` JSON line per character until the response ends."""
    t0 = time.perf_counter()
    arrivals: list[float] = []
    async with client.stream("POST", "/predict", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line:
                now = time.perf_counter()
                arrivals.extend([now] * len(json.loads(line)["text"]))
    return t0, arrivals


async def ws_stream(port: int, body: dict[str, Any]) -> Result:
    result = await ws_client.generate("127.0.0.1", port, {"type": "generate", **body})
    if result.final is None or result.final.get("type") != "done":
        raise RuntimeError(f"stream ended with {result.final}")
    return result.t0, result.arrivals


def stream_once(kind: str, server: ServerProcess, body: dict[str, Any], path: str = "/v1/generate") -> Result:
    """One request on a fresh client: for time to first character."""

    async def go() -> Result:
        async with httpx.AsyncClient(base_url=server.base, timeout=300) as client:
            await client.get(server.ready_path)  # the connection is open before the clock starts
            if kind == "peer":
                return await peer_stream(client, body)
            return await sse_stream(client, path, body)

    return uvloop.run(go())


def run_load(kind: str, server: ServerProcess, streams: int, chars: int) -> dict[str, float]:
    """`streams` concurrent generations of `chars` characters each: aggregate chars/s and first-char latency."""

    async def go() -> tuple[list[Result], float]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=server.base, timeout=600, limits=limits) as client:
            t0 = time.perf_counter()
            tasks: list[Coroutine[Any, Any, Result]] = []
            for seed in range(streams):
                body = {"prompt": "ROMEO:", "max_new_chars": chars, "seed": seed}
                if kind == "peer":
                    tasks.append(peer_stream(client, body))
                elif kind == "ws":
                    tasks.append(ws_stream(server.port, body))
                else:
                    tasks.append(sse_stream(client, "/v1/generate", body))
            results = await asyncio.gather(*tasks)
            return list(results), time.perf_counter() - t0

    cpu0, client0 = server.cpu_seconds(), own_cpu_seconds()
    results, wall = uvloop.run(go())
    total = sum(len(a) for _, a in results)
    if total != streams * chars:
        raise RuntimeError(f"{kind}: {total} characters arrived, {streams * chars} were asked for")
    return {
        "chars_per_s": total / wall,
        "ttfc_p50_ms": statistics.median(a[0] - t0 for t0, a in results) * 1e3,
        "ttfc_max_ms": max(a[0] - t0 for t0, a in results) * 1e3,
        "server_cpu_pct": 100 * (server.cpu_seconds() - cpu0) / wall,
        "client_cpu_pct": 100 * (own_cpu_seconds() - client0) / wall,
    }


def first_char_ms(request: Callable[[], Result], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0, arrivals = request()
        if not arrivals:
            raise RuntimeError("no character arrived")
        times.append((arrivals[0] - t0) * 1e3)
    return statistics.median(times)


def idle_cpu_pct(server: ServerProcess, seconds: float) -> float:
    cpu0 = server.cpu_seconds()
    time.sleep(seconds)
    return 100 * (server.cpu_seconds() - cpu0) / seconds


# -- the run ---------------------------------------------------------------------------------------


KINDS = ("sse", "ws", "peer")  # charstream's SSE and WebSocket routes, and the peer's streaming


class Runs(NamedTuple):
    load: dict[str, dict[int, list[dict[str, float]]]]  # kind -> streams -> each round's run_load
    ttfc: dict[str, list[float]]  # case -> each round's first-character ms
    idle_cpu_pct: dict[str, float]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default=str(REPO / "exports"))
    parser.add_argument("--model", default="shakespeare-lstm")
    parser.add_argument("--streams", default="1,8,64")
    parser.add_argument(
        "--chars", type=int, default=400, help="characters per stream (at least --level-chars / streams)"
    )
    parser.add_argument("--level-chars", type=int, default=8000, help="characters per level at least, so it lasts")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is kept")
    parser.add_argument("--repeats", type=int, default=5, help="first-character requests per case and round")
    parser.add_argument("--peer-batch-timeout", type=float, default=0.01, help="LitServe's batch_timeout (s)")
    parser.add_argument("--name", default="peers", help="results file name")
    parser.add_argument("--plot", default=str(DOCS / "peers.png"))
    return parser.parse_args()


def ttfc_cases(charstream: ServerProcess, peer: ServerProcess, history: str) -> dict[str, Callable[[], Result]]:
    """The first-character requests compared; charstream's session holding `history` is made here."""
    with httpx.Client(base_url=charstream.base, timeout=300) as c:
        session = c.post("/v1/sessions", json={"prompt": history}).json()["id"]
    short = {"prompt": "ROMEO:", "max_new_chars": 1}
    return {
        "fresh: charstream": lambda: stream_once("sse", charstream, short),
        "fresh: litserve": lambda: stream_once("peer", peer, short),
        "history: charstream, session continued": lambda: stream_once(
            "sse", charstream, {"max_new_chars": 1}, f"/v1/sessions/{session}/generate"
        ),
        "history: litserve, re-read": lambda: stream_once("peer", peer, {"prompt": history, "max_new_chars": 1}),
        "history: charstream, re-read": lambda: stream_once("sse", charstream, {"prompt": history, "max_new_chars": 1}),
    }


def measure(args: argparse.Namespace, levels: list[int], charstream: ServerProcess, peer: ServerProcess) -> Runs:
    """Warm-up, idle CPU, then every kind at every level and every first-character case, each round."""
    servers = {"sse": charstream, "ws": charstream, "peer": peer}

    def quiet(kind: str) -> contextlib.AbstractContextManager[None]:
        # The idle peer polls its queues (idle_cpu_pct below); idle charstream sleeps. On two
        # cores that polling would be taken from charstream, so the peer is paused meanwhile.
        return peer.paused() if kind != "peer" else contextlib.nullcontext()

    # First requests pay for imports, code paths and buffers: not measured.
    for kind in KINDS:
        run_load(kind, servers[kind], 8, 200)
    idle = {"charstream": idle_cpu_pct(charstream, 3), "litserve": idle_cpu_pct(peer, 3)}
    history = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:HISTORY_CHARS]
    cases = ttfc_cases(charstream, peer, history)
    runs = Runs({k: {n: [] for n in levels} for k in KINDS}, {case: [] for case in cases}, idle)
    for r in range(args.rounds):
        order = KINDS[r % 3 :] + KINDS[: r % 3]  # who goes first changes each round
        for n in levels:
            for kind in order:
                with quiet(kind):
                    run = run_load(kind, servers[kind], n, max(args.chars, args.level_chars // n))
                runs.load[kind][n].append(run)
                print(f"round {r + 1} {kind:>4} {n:>3} streams: {run['chars_per_s']:,.0f} chars/s")
        for case, request in cases.items():
            with quiet("peer" if "litserve" in case else "sse"):
                runs.ttfc[case].append(first_char_ms(request, args.repeats))
    return runs


def ratios(load: dict[str, dict[int, dict[str, float]]], ttfc: dict[str, float]) -> dict[str, float]:
    levels = list(load["peer"])
    return {
        **{f"sse_vs_litserve_{n}": load["sse"][n]["chars_per_s"] / load["peer"][n]["chars_per_s"] for n in levels},
        **{f"ws_vs_litserve_{n}": load["ws"][n]["chars_per_s"] / load["peer"][n]["chars_per_s"] for n in levels},
        "fresh_ttfc_litserve_vs_charstream": ttfc["fresh: litserve"] / ttfc["fresh: charstream"],
        "history_ttfc_litserve_vs_charstream": ttfc["history: litserve, re-read"]
        / ttfc["history: charstream, session continued"],
    }


def print_tables(report: dict[str, Any], levels: list[int]) -> None:
    load = {"sse": report["load"]["charstream_sse"], "ws": report["load"]["charstream_ws"]}
    load["peer"] = report["load"]["litserve"]
    print()
    print(f"Aggregate chars/s, model {report['model']} fp32 (median of {report['rounds']} interleaved rounds)")
    headers = ["streams", "charstream SSE", "LitServe", "SSE / LitServe", "charstream WebSocket"]
    headers += ["ttfc p50 ms SSE", "ttfc p50 ms LitServe", "server cpu % SSE", "server cpu % LitServe"]
    rows = [
        [
            n,
            load["sse"][n]["chars_per_s"],
            load["peer"][n]["chars_per_s"],
            report["ratios"][f"sse_vs_litserve_{n}"],
            load["ws"][n]["chars_per_s"],
            load["sse"][n]["ttfc_p50_ms"],
            load["peer"][n]["ttfc_p50_ms"],
            load["sse"][n]["server_cpu_pct"],
            load["peer"][n]["server_cpu_pct"],
        ]
        for n in levels
    ]
    print(table(headers, rows))
    print()
    print("Time to first character, one request at a time (ms)")
    print(table(["case", "ms"], [[case, v] for case, v in report["ttfc_ms"].items()]))
    print()
    print(table(["ratio", "value"], [[k, v] for k, v in report["ratios"].items()]))
    print(f"idle server CPU %: {report['idle_cpu_pct']}")


def main() -> None:
    args = parse_args()
    models_dir = Path(args.models_dir)
    levels = [int(x) for x in args.streams.split(",")]
    charstream = start_grouped_charstream(models_dir, args.model, 8941)
    peer_options = ["--max-batch-size", str(max(2, *levels)), "--batch-timeout", str(args.peer_batch_timeout)]
    peer = start_peer(models_dir / args.model / "model.onnx", 8942, *peer_options)
    try:
        runs = measure(args, levels, charstream, peer)
    finally:
        charstream.stop()
        peer.stop()

    load = {kind: {n: median_of_runs(r) for n, r in by_n.items()} for kind, by_n in runs.load.items()}
    ttfc = {case: statistics.median(v) for case, v in runs.ttfc.items()}
    report = {
        "commit": _commit(),
        "model": args.model,
        "history_chars": HISTORY_CHARS,
        "rounds": args.rounds,
        "peer": {"server": "litserve", "max_batch_size": max(2, *levels), "batch_timeout_s": args.peer_batch_timeout},
        "load": {"charstream_sse": load["sse"], "charstream_ws": load["ws"], "litserve": load["peer"]},
        "ttfc_ms": ttfc,
        "ratios": ratios(load, ttfc),
        "idle_cpu_pct": runs.idle_cpu_pct,
    }
    print_tables(report, levels)
    print()
    print(markdown(report))
    path = write_results(args.name, report)
    plot(report, Path(args.plot))
    print(f"results: {path}, plot: {args.plot}")


def markdown(report: dict[str, Any]) -> str:
    """The headline tables, as the performance page shows them."""
    load, ttfc = report["load"], report["ttfc_ms"]
    lines = [
        "| streams | charstream SSE | LitServe | charstream / LitServe | charstream WebSocket |",
        "|---|---|---|---|---|",
    ]
    for n, peer in load["litserve"].items():
        sse, ws = load["charstream_sse"][n]["chars_per_s"], load["charstream_ws"][n]["chars_per_s"]
        lines.append(
            f"| {n} | {sse:,.0f} | {peer['chars_per_s']:,.0f} | {sse / peer['chars_per_s']:.2f}x | {ws:,.0f} |"
        )
    fresh_cs, fresh_peer = ttfc["fresh: charstream"], ttfc["fresh: litserve"]
    hist_cs, hist_peer = ttfc["history: charstream, session continued"], ttfc["history: litserve, re-read"]
    lines += [
        "",
        "| time to first character | charstream | LitServe | LitServe / charstream |",
        "|---|---|---|---|",
        f"| fresh prompt | {fresh_cs:.1f} ms | {fresh_peer:.1f} ms | {fresh_peer / fresh_cs:.2f}x |",
        f"| {report['history_chars']:,} chars of history | {hist_cs:.1f} ms (session continued) "
        f"| {hist_peer:,.0f} ms (re-read) | {hist_peer / hist_cs:,.0f}x |",
    ]
    return "\n".join(lines)


def _commit() -> str:
    """The commit measured, marked when the tree held changes not yet committed."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "service"], cwd=REPO, capture_output=True, text=True)
    return head.stdout.strip() + (" (service/ changed since)" if dirty.stdout.strip() else "")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = {"charstream_sse": "charstream, SSE", "charstream_ws": "charstream, WebSocket", "litserve": "LitServe"}
    for key, label in labels.items():
        runs = report["load"][key]
        left.plot(list(runs), [r["chars_per_s"] for r in runs.values()], marker="o", label=label)
    left.set_xscale("log", base=2)
    levels = list(report["load"]["litserve"])
    left.set_xticks(levels, [str(n) for n in levels])
    left.set_ylim(bottom=0)
    left.set_xlabel("concurrent streams")
    left.set_ylabel("aggregate chars/s")
    left.grid(alpha=0.3)
    left.legend()
    ttfc = report["ttfc_ms"]
    history = f"{report['history_chars']:,} chars of history"
    cases = [
        ("fresh prompt", "fresh: charstream", "fresh: litserve"),
        (history, "history: charstream, session continued", "history: litserve, re-read"),
    ]
    xs = range(len(cases))
    left_bars = [ttfc[c] for _, c, _ in cases]
    right_bars = [ttfc[p] for _, _, p in cases]
    right.bar([x - 0.2 for x in xs], left_bars, width=0.4, label="charstream (session continued)")
    right.bar([x + 0.2 for x in xs], right_bars, width=0.4, label="LitServe (prompt re-read)")
    right.set_xticks(list(xs), [name for name, _, _ in cases])
    right.set_yscale("log")
    right.set_ylabel("time to first character, ms")
    right.grid(alpha=0.3, axis="y")
    right.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()

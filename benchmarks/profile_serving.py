"""Where the server's time goes at 64 WebSocket streams: py-spy samples a real server process
while the benchmark's lean client drives it, and writes a flame graph (SVG) and the top
functions by own time.

    python -m benchmarks.profile_serving [--variant int8] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import uvloop

from benchmarks import ws_client
from benchmarks.common import REPO, start_charstream

STREAMS = 64


async def load(port: int, seconds: float) -> int:
    """64 streams, each restarted as it ends, until `seconds` have passed; returns characters received."""
    deadline = time.perf_counter() + seconds
    received = 0

    async def stream(seed: int) -> None:
        nonlocal received
        while time.perf_counter() < deadline:
            request = {"type": "generate", "prompt": "ROMEO:", "max_new_chars": 2000, "seed": seed}
            result = await ws_client.generate("127.0.0.1", port, request)
            received += len(result.arrivals)

    await asyncio.gather(*(stream(i) for i in range(STREAMS)))
    return received


def top_functions(collapsed: Path, n: int = 25) -> str:
    """The functions with the most samples of their own, and each thread's share, from py-spy's raw output."""
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        threads[frames[0]] += int(count)
        own[frames[-1]] += int(count)
    lines = [f"{total} samples"]
    lines += [f"{c / total:6.1%}  thread {t}" for t, c in threads.most_common(8)]
    lines += [f"{c / total:6.1%}  {f}" for f, c in own.most_common(n)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--port", type=int, default=8831)
    parser.add_argument("--out", default=str(REPO / "docs"), help="folder for the flame graph and the top list")
    args = parser.parse_args()
    out = Path(args.out)
    server = start_charstream(args.port, variant=args.variant)
    try:
        uvloop.run(load(args.port, 3))  # warm-up
        collapsed = Path(tempfile.mkdtemp()) / "collapsed.txt"  # raw stacks: summarised below, not kept
        for fmt, path in (("flamegraph", out / f"profile-serving-{args.variant}.svg"), ("raw", collapsed)):
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(server.proc.pid), "--duration", str(int(args.seconds)),
                 "--rate", "250", "--threads", "--nonblocking", "--format", fmt, "--output", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1)
            t0 = time.perf_counter()
            chars = uvloop.run(load(args.port, args.seconds))
            print(f"{chars / (time.perf_counter() - t0):,.0f} chars/s while sampled ({fmt})")
            spy.wait(timeout=120)
            print(f"wrote {path}")
    finally:
        server.stop()
    summary = top_functions(collapsed)
    (out / f"profile-serving-{args.variant}.top.txt").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()

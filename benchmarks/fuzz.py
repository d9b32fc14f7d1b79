"""A long schemathesis run against a real server process (the test suite runs a short one):
every operation of the app's own OpenAPI schema, fuzzed; counts answers by status, 5xx,
requests that hung, tracebacks in the server's log, and sessions left leased afterwards.

    python -m benchmarks.fuzz [--examples 300]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings

from benchmarks.common import SERVE, ServerProcess, free_port, table, write_results

REPO = Path(__file__).resolve().parents[1]
# A real traceback, not a fuzzed path that happens to hold the word.
TRACEBACK = "Traceback (most recent call last)"


def _positions(text: str, needle: str) -> list[int]:
    found, at = [], text.find(needle)
    while at >= 0:
        found.append(at)
        at = text.find(needle, at + 1)
    return found


class Findings:
    """What the fuzzed requests met: answers by status, findings of the schema checks, requests that hung."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self.hung = 0

    def fuzz(self, operation: Any, examples: int) -> None:
        """`examples` cases of one operation, each sent and its answer checked against the schema."""
        label = operation.label

        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: schemathesis.Case[Any]) -> None:
            try:
                response = case.call(timeout=60)
            except httpx.TimeoutException:
                self.hung += 1
                return
            self.statuses[response.status_code] += 1
            try:
                case.validate_response(response)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # a finding (an exception group): recorded, the run goes on
                self.failures.append(f"{label}: {str(exc).splitlines()[0]}")

        fuzz()


def left_running(base: str) -> tuple[float, float]:
    """Sessions left leased and generations left running, from the server's /metrics."""
    with httpx.Client(base_url=base) as c:
        metrics = c.get("/metrics").text.splitlines()
    busy = next(float(x.split()[1]) for x in metrics if x.startswith("charstream_sessions_busy "))
    running = sum(float(x.split()[1]) for x in metrics if x.startswith("charstream_active_generations{"))
    return busy, running


def run(examples: int, log: Path) -> dict[str, Any]:
    """Every operation of the server's schema fuzzed, then what it left behind and what its log holds."""
    port = free_port()
    env = {
        "CHARSTREAM_HOST": "127.0.0.1",
        "CHARSTREAM_PORT": str(port),
        "CHARSTREAM_MODELS_DIR": str(REPO / "exports"),
        "CHARSTREAM_MAX_NEW_CHARS": "300",
        "CHARSTREAM_MAX_PROMPT_CHARS": "2000",
        "CHARSTREAM_LOG_JSON": "false",
    }
    found = Findings()
    with ServerProcess(SERVE, port, env=env, log=log) as server:
        schema = schemathesis.openapi.from_url(f"{server.base}/openapi.json")
        operations: list[Any] = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
        t0 = time.perf_counter()
        for operation in operations:
            found.fuzz(operation, examples)
        wall = time.perf_counter() - t0
        busy, running = left_running(server.base)
    server_log = log.read_text()
    statuses = found.statuses
    return {
        "operations": len(operations),
        "requests": sum(statuses.values()),
        "seconds": wall,
        "statuses": dict(sorted(statuses.items())),
        "server_errors_5xx": sum(n for s, n in statuses.items() if s >= 500 and s != 503),
        "hung": found.hung,
        "tracebacks": server_log.count(TRACEBACK),
        "leased_after": busy,
        "running_after": running,
        "findings": sorted(set(found.failures)),
        "traceback_excerpts": [server_log[i : i + 3000] for i in _positions(server_log, TRACEBACK)][:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300, help="examples per operation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.examples, Path(tmp) / "server.log")
    print(table(["status", "answers"], list(result["statuses"].items())))
    print(
        f"\n{result['requests']:,} requests over {result['operations']} operations in {result['seconds']:.0f} s: "
        f"5xx (other than 503) {result['server_errors_5xx']}, hung {result['hung']}, "
        f"tracebacks {result['tracebacks']}, sessions left leased {result['leased_after']:.0f}, "
        f"generations left running {result['running_after']:.0f}, schema findings {len(result['findings'])}"
    )
    for finding in result["findings"][:20]:
        print("  ", finding)
    for excerpt in result["traceback_excerpts"]:
        print(excerpt)
    print(f"wrote {write_results('fuzz', result)}")


if __name__ == "__main__":
    main()

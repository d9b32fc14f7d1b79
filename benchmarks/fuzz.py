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

from benchmarks.common import table, write_results
from tests.utils import serve_process

REPO = Path(__file__).resolve().parents[1]
# A real traceback, not a fuzzed path that happens to hold the word.
TRACEBACK = "Traceback (most recent call last)"


def _positions(text: str, needle: str) -> list[int]:
    found, at = [], text.find(needle)
    while at >= 0:
        found.append(at)
        at = text.find(needle, at + 1)
    return found


def main() -> None:
    # One run read top to bottom (arguments, the runs side by side, the table, the results file):
    # its steps share the run's servers and numbers, so they stay in one function.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300, help="examples per operation")
    args = parser.parse_args()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    hung = 0
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        env = {
            "CHARSTREAM_MODELS_DIR": str(REPO / "exports"),
            "CHARSTREAM_MAX_NEW_CHARS": "300",
            "CHARSTREAM_MAX_PROMPT_CHARS": "2000",
            "CHARSTREAM_LOG_JSON": "false",
        }
        with serve_process(log, None, **env) as server:
            schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
            operations: list[Any] = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
            t0 = time.perf_counter()
            for operation in operations:
                label = operation.label

                @given(case=operation.as_strategy())
                @settings(
                    max_examples=args.examples,
                    deadline=None,
                    suppress_health_check=list(HealthCheck),
                    database=None,
                )
                def fuzz(case: schemathesis.Case[Any]) -> None:
                    nonlocal hung
                    try:
                        response = case.call(timeout=60)
                    except httpx.TimeoutException:
                        hung += 1
                        return
                    statuses[response.status_code] += 1
                    try:
                        case.validate_response(response)
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except BaseException as exc:  # a finding (an exception group): recorded, the run goes on
                        failures.append(f"{label}: {str(exc).splitlines()[0]}")  # noqa: B023 (run at once)

                fuzz()
            wall = time.perf_counter() - t0
            with httpx.Client(base_url=server.base_url) as c:
                metrics = c.get("/metrics").text
            busy = next(float(x.split()[1]) for x in metrics.splitlines() if x.startswith("charstream_sessions_busy "))
            running = sum(
                float(x.split()[1]) for x in metrics.splitlines() if x.startswith("charstream_active_generations{")
            )
        server_log = log.read_text()
        tracebacks = server_log.count(TRACEBACK)
        excerpts = [server_log[i : i + 3000] for i in _positions(server_log, TRACEBACK)][:5]
    total = sum(statuses.values())
    result: dict[str, Any] = {
        "operations": len(operations),
        "requests": total,
        "seconds": wall,
        "statuses": dict(sorted(statuses.items())),
        "server_errors_5xx": sum(n for s, n in statuses.items() if s >= 500 and s != 503),
        "hung": hung,
        "tracebacks": tracebacks,
        "leased_after": busy,
        "running_after": running,
        "findings": sorted(set(failures)),
        "traceback_excerpts": excerpts,
    }
    print(table(["status", "answers"], sorted(statuses.items())))
    print(
        f"\n{total:,} requests over {len(operations)} operations in {wall:.0f} s: "
        f"5xx (other than 503) {result['server_errors_5xx']}, hung {hung}, tracebacks {tracebacks}, "
        f"sessions left leased {busy:.0f}, generations left running {running:.0f}, "
        f"schema findings {len(result['findings'])}"
    )
    for finding in result["findings"][:20]:
        print("  ", finding)
    for excerpt in excerpts:
        print(excerpt)
    print(f"wrote {write_results('fuzz', result)}")


if __name__ == "__main__":
    main()

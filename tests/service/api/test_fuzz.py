"""schemathesis against the app's own OpenAPI schema, on a real server: no 5xx, answers as the
schema says, and afterwards no request left running and no session left leased."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.api.openai.protocol import MAX_CHOICES
from tests.utils import Server, leased_sessions, run_server

# Bounded so that `make test` stays quick; `benchmarks/fuzz.py` runs thousands.
EXAMPLES_PER_OPERATION = 20


@pytest.fixture(scope="module")
def fuzzed_server(models_dir: Path) -> Iterator[Server]:
    with run_server(models_dir=models_dir, default_model="tiny-lstm", max_new_chars=300, max_prompt_chars=2000) as s:
        yield s


def test_the_api_keeps_its_schema(fuzzed_server: Server) -> None:
    """Every operation, fuzzed from the schema: no 5xx, and status, headers and body as documented."""
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def fuzz(case: schemathesis.Case) -> None:
            excluded = [positive_data_acceptance] if _constrains(case.body) or _crosses(case.body) else []
            case.call_and_validate(timeout=30, excluded_checks=excluded)

        fuzz()


def _constrains(body: object) -> bool:
    """A constraint's validity (does the regex compile, can the model's characters meet it) is more than a
    schema can state: such requests must still never fail with a 5xx or leave the schema, but may get a 4xx."""
    if not isinstance(body, dict):
        return False
    response_format = body.get("response_format")
    return body.get("structured_outputs") is not None or (
        isinstance(response_format, dict) and response_format.get("type") != "text"
    )


def _crosses(body: object) -> bool:
    """Limits between fields, which a schema cannot state: n x prompts at most MAX_CHOICES, unique not with
    stream. Such requests get a 400 naming the field (tested in the bad-input table)."""
    if not isinstance(body, dict):
        return False
    prompt, n = body.get("prompt"), body.get("n")
    prompts = len(prompt) if isinstance(prompt, list) else 1
    too_many = isinstance(n, int | float) and n * prompts > MAX_CHOICES
    return too_many or (body.get("unique") is True and body.get("stream") is True)


def test_nothing_left_running_or_leased_after_the_fuzzing(fuzzed_server: Server) -> None:
    service = fuzzed_server.app.state.service  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while (service.running or leased_sessions(fuzzed_server)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.running == 0
    assert leased_sessions(fuzzed_server) == 0

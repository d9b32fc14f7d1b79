"""The benchmark's lean WebSocket client against a real server: what it counts is what was sent."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from benchmarks import ws_client
from tests.utils import Server, run_server


@pytest.fixture(scope="module")
def server(models_dir: Path) -> Iterator[Server]:
    with run_server(models_dir=models_dir, default_model="tiny-lstm") as s:
        yield s


def _generate(server: Server, request: dict[str, object]) -> ws_client.StreamResult:
    url = urlsplit(server.ws_url)
    assert url.hostname is not None and url.port is not None
    return asyncio.run(ws_client.generate(url.hostname, url.port, request))


def test_every_character_is_stamped_once_in_order(server: Server) -> None:
    result = _generate(server, {"type": "generate", "prompt": "ROMEO:", "max_new_chars": 300, "seed": 1})
    assert result.final is not None and result.final["type"] == "done"
    assert result.final["usage"] == {"prompt_chars": 6, "generated_chars": 300}
    assert len(result.arrivals) == 300
    assert result.t0 <= result.arrivals[0] and result.arrivals == sorted(result.arrivals)


def test_a_refused_request_ends_with_the_servers_error(server: Server) -> None:
    result = _generate(server, {"type": "generate", "prompt": "ROMEO:", "max_new_chars": -1})
    assert result.final is not None and result.final["type"] == "error"
    assert result.final["field"] == "max_new_chars" and result.arrivals == []


def test_a_server_that_goes_away_is_an_error_not_a_hang(models_dir: Path) -> None:
    with run_server(models_dir=models_dir, default_model="tiny-lstm") as short_lived:
        url = urlsplit(short_lived.ws_url)
    assert url.port is not None
    with pytest.raises(OSError):
        asyncio.run(ws_client.generate("127.0.0.1", url.port, {"type": "generate", "max_new_chars": 5}))

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer
from tests.utils import Server, run_server


@pytest.fixture(scope="module")
def server(models_dir: Path) -> Iterator[Server]:
    with run_server(
        models_dir=models_dir,
        default_model="tiny-lstm",
        max_new_chars=100_000,
        max_prompt_chars=20_000,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on loopback for this module's tests, always stopped."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()

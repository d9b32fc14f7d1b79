"""What a test does when a real part it needs (a browser, a container engine, a server) is missing
and cannot be installed: it skips, or, under `pytest --require-all-parts` (what `make test` and so
CI run), it fails with one line naming the part and the command that installs it."""

from __future__ import annotations

from typing import NoReturn

import pytest

REQUIRE_ALL_PARTS = "--require-all-parts"


def part_missing(config: pytest.Config, part: str, install: str, why: str = "") -> NoReturn:
    message = f"{part} is not available{f' ({why})' if why else ''}; install it with: {install}"
    if config.getoption(REQUIRE_ALL_PARTS):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)

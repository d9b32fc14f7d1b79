"""The completions benchmark's client against a real server: it counts every character sent, as the native one does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from benchmarks.openai_compat import completion_stream
from benchmarks.serving import sse_stream
from tests.utils import run_server


def test_both_clients_count_the_same_characters(models_dir: Path) -> None:
    async def both(base_url: str) -> tuple[tuple[float, list[float]], tuple[float, list[float]]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            return (
                await completion_stream(client, 300, 1, model="tiny-lstm"),
                await sse_stream(client, 300, 1),
            )

    with run_server(models_dir=models_dir, default_model="tiny-lstm") as s:
        (t0, completion), (_, native) = asyncio.run(both(s.base_url))
    assert len(completion) == len(native) == 300
    assert t0 <= completion[0] and completion == sorted(completion)

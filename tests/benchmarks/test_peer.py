"""The LitServe peer of the benchmarks serves the same model: its greedy text is charstream's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.common import ServerProcess
from benchmarks.peers_bench import peer_stream, start_peer
from tests.utils import free_port, run_server

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def peer(models_dir: Path) -> Iterator[ServerProcess]:
    server = start_peer(models_dir / "tiny-lstm" / "model.onnx", free_port())
    try:
        yield server
    finally:
        server.stop()


def _stream(peer: ServerProcess, body: dict[str, object]) -> list[str]:
    """The JSON lines of one streamed answer, as they arrive: one character each."""
    with httpx.Client(base_url=peer.base, timeout=60) as c, c.stream("POST", "/predict", json=body) as r:
        assert r.status_code == 200
        return [json.loads(line)["text"] for line in r.iter_lines() if line]


def test_greedy_text_equals_charstreams(peer: ServerProcess, models_dir: Path) -> None:
    greedy = {"prompt": "ROMEO:", "max_new_chars": 40, "temperature": 0}
    # The same sampling too: one uniform draw per character from PCG64(seed), inverse CDF.
    seeded = {"prompt": "ROMEO:", "max_new_chars": 40, "temperature": 0.8, "top_k": 5, "seed": 11}
    with run_server(models_dir=models_dir, default_model="tiny-lstm") as server, server.client() as c:
        expected = [c.post("/v1/generate", json=body).json()["text"] for body in (greedy, seeded)]
    chunks = _stream(peer, greedy)
    assert len(expected[0]) == 40 and all(len(ch) == 1 for ch in chunks)
    assert "".join(chunks) == expected[0]
    assert "".join(_stream(peer, seeded)) == expected[1]


def test_the_benchmark_client_stamps_every_character(peer: ServerProcess) -> None:
    async def go() -> tuple[float, list[float]]:
        async with httpx.AsyncClient(base_url=peer.base, timeout=60) as client:
            return await peer_stream(client, {"prompt": "ROMEO:", "max_new_chars": 25, "seed": 3})

    t0, arrivals = asyncio.run(go())
    assert len(arrivals) == 25 and t0 <= arrivals[0] and arrivals == sorted(arrivals)


def test_requests_of_one_batch_end_at_their_own_length(peer: ServerProcess) -> None:
    async def go() -> list[tuple[float, list[float]]]:
        async with httpx.AsyncClient(base_url=peer.base, timeout=60) as client:
            bodies = [{"prompt": "ROMEO:", "max_new_chars": n, "seed": n} for n in (30, 10, 1)]
            return await asyncio.gather(*(peer_stream(client, b) for b in bodies))

    assert [len(arrivals) for _, arrivals in asyncio.run(go())] == [30, 10, 1]


def test_a_prompt_outside_the_vocabulary_gets_no_text(peer: ServerProcess) -> None:
    # LitServe has sent its 200 and headers before decode_request runs: the stream just ends.
    assert _stream(peer, {"prompt": "ROMEO:\x00", "max_new_chars": 5}) == []

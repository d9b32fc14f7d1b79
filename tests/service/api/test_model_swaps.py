"""Models swapped without a restart, on a real server under load: a new version renamed into place
(as the export writes it) is swapped in by the admin route or noticed by the poll; streams running
across the swap finish on their version with no 5xx and none dropped; a session made by the old
file gets 409 session_model_mismatch; a version that does not load leaves the old one serving and
/readyz says why."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from exports.contract import VARIANT_FILES
from tests.utils import run_server

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN_KEY = "operator-s3cret"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
STREAMS = 12  # clients streaming without pause through the swap


def install(models: Path, source: Path, name: str = "m") -> None:
    """`source` becomes model `name` as the export writes a folder: staged beside it, then renamed in."""
    staging = models / f".{name}.staging"
    shutil.copytree(source, staging)
    final = models / name
    if final.exists():
        final.rename(models / f".{name}.{time.monotonic_ns()}.old")
    staging.rename(final)


def until(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def cell(c: httpx.Client, model: str = "m") -> str:
    (m,) = [m for m in c.get("/v1/models", headers=AUTH).json()["data"] if m["id"] == model]
    return str(m["cell"])


async def stream_once(http: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, str, bool]:
    """Status, text and whether the stream ended with its final event and [DONE]."""
    text, final, done = "", False, False
    async with http.stream("POST", "/v1/generate", json=body | {"stream": True}, headers=AUTH) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.text, False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += event.get("text", "")
                final = final or "finish_reason" in event
    return 200, text, final and done


def test_admin_reload_swaps_under_load(models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    install(models, models_dir / "tiny-lstm")
    old_body = {"prompt": "ROMEO:", "max_new_chars": 400, "seed": 5, "temperature": 0.9}
    with run_server(
        models_dir=models, api_key=KEY, admin_key=ADMIN_KEY, model_poll_s=0, max_new_chars=100_000
    ) as server:
        with server.client() as c:
            old_text = c.post("/v1/generate", json=old_body, headers=AUTH).json()["text"]
            old_session = c.post("/v1/sessions", json={"prompt": "KING:"}, headers=AUTH).json()["id"]
            assert c.post("/v1/admin/models/m/reload").status_code == 401
            assert c.post("/v1/admin/models/m/reload", headers=AUTH).status_code == 403  # a user's key
            assert c.post("/v1/admin/models/nope/reload", headers=ADMIN_AUTH).status_code == 404
            unchanged = c.post("/v1/admin/models/m/reload", headers=ADMIN_AUTH).json()
            assert unchanged["swapped"] is False and unchanged["version"] == unchanged["previous"]

        results: list[tuple[int, str, bool]] = []
        swapped = threading.Event()

        async def load() -> tuple[int, str, bool]:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:

                async def client() -> None:
                    while not swapped.is_set() or len(results) < 3 * STREAMS:
                        results.append(await stream_once(http, {"max_new_chars": 150, "temperature": 0.8}))

                clients = [asyncio.create_task(client()) for _ in range(STREAMS)]
                # Started before the swap, read partly before it and the rest after: the old version's text.
                across = await stream_once_across_swap(http, old_body, swap)
                await asyncio.gather(*clients)
                return across

        def swap() -> None:
            install(models, models_dir / "tiny-gru")
            with server.client() as c:
                r = c.post("/v1/admin/models/m/reload", headers=ADMIN_AUTH)
            assert r.status_code == 200, r.text
            assert r.json()["swapped"] is True and r.json()["version"] != r.json()["previous"]
            swapped.set()

        across = asyncio.run(load())
        assert across == (200, old_text, True)
        assert [r for r in results if r[0] != 200 or not r[2]] == []  # no 5xx, no stream cut short
        with server.client() as c:
            assert cell(c) == "gru"  # new requests get the new version
            assert c.post("/v1/generate", json=old_body, headers=AUTH).json()["text"] != old_text
            refused = c.post(f"/v1/sessions/{old_session}/generate", json={"max_new_chars": 5}, headers=AUTH)
            assert refused.status_code == 409, refused.text
            assert refused.json()["error"]["code"] == "session_model_mismatch"
            fresh = c.post("/v1/sessions", json={"prompt": "KING:"}, headers=AUTH).json()["id"]
            assert c.post(f"/v1/sessions/{fresh}/generate", json={"max_new_chars": 5}, headers=AUTH).status_code == 200
            assert c.get("/readyz").json()["swap_failed"] == {}


async def stream_once_across_swap(
    http: httpx.AsyncClient, body: dict[str, Any], swap: Callable[[], None]
) -> tuple[int, str, bool]:
    text, final, done, swapped = "", False, False, False
    async with http.stream("POST", "/v1/generate", json=body | {"stream": True}, headers=AUTH) as r:
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                text += event.get("text", "")
                final = final or "finish_reason" in event
                if not swapped and text:
                    await asyncio.to_thread(swap)  # the stream is running: swap now
                    swapped = True
        return r.status_code, text, final and done and swapped


def test_poll_notices_new_versions_and_a_broken_one_leaves_the_old_serving(models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    install(models, models_dir / "tiny-lstm")
    broken = tmp_path / "broken"
    shutil.copytree(models_dir / "tiny-lstm", broken)
    (broken / VARIANT_FILES["fp32"]).write_bytes(b"not an onnx graph")
    with run_server(models_dir=models, model_poll_s=0.1) as server, server.client() as c:
        assert c.post("/v1/admin/models/m/reload").status_code == 403  # no key set: admin routes refuse
        install(models, broken)
        until(lambda: "m" in c.get("/readyz").json()["swap_failed"], "the broken version to be tried")
        ready = c.get("/readyz")
        assert ready.status_code == 200 and "previous one serves" in ready.json()["swap_failed"]["m"]
        assert cell(c) == "lstm"
        assert c.post("/v1/generate", json={"max_new_chars": 10}).status_code == 200
        install(models, models_dir / "tiny-gru")
        until(lambda: cell(c) == "gru", "the new version to be swapped in")
        assert c.get("/readyz").json()["swap_failed"] == {}
        assert c.post("/v1/generate", json={"max_new_chars": 10}).status_code == 200


def test_poll_loads_a_model_folder_that_appears(models_dir: Path, tmp_path: Path) -> None:
    """A server started with no model is not ready; a folder renamed in is loaded and served."""
    models = tmp_path / "models"
    models.mkdir()
    with run_server(models_dir=models, model_poll_s=0.1) as server, server.client() as c:
        assert c.get("/readyz").status_code == 503
        install(models, models_dir / "tiny-rnn", "n")
        until(lambda: c.get("/readyz").status_code == 200, "the new folder to be loaded")
        assert cell(c, "n") == "rnn" and c.get("/readyz").json()["failed"] == {}
        assert c.post("/v1/generate", json={"max_new_chars": 10}).status_code == 200  # the default now
        install(models, models_dir / "tiny-gru", "g")
        until(lambda: "g" in c.get("/readyz").json()["models"], "a second folder to be loaded")
        assert c.post("/v1/generate", json={"model": "g", "max_new_chars": 10}).status_code == 200

"""A session belongs to the key that made it: another key finds nothing there (404 on every route,
the WebSocket and the OpenAI side), across replicas sharing a Redis, and a key holds at most its
max_sessions at once."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from service.api.auth import WS_KEY_PREFIX, WS_PROTOCOL
from tests.redis_server import RedisServer
from tests.utils import Server, run_server

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"
ALICE_SESSIONS = 3


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(f'[keys.alice]\nkey = "{ALICE}"\nmax_sessions = {ALICE_SESSIONS}\n\n[keys.bob]\nkey = "{BOB}"\n')
    return path


@contextlib.contextmanager
def two_servers(store: str, models_dir: Path, keys_file: Path, redis: RedisServer | None) -> Iterator[list[Server]]:
    """Two replicas sharing a Redis, or one server with its sessions in memory (twice)."""
    settings: dict[str, Any] = {"models_dir": models_dir, "keys_file": keys_file, "default_model": "tiny-lstm"}
    if store == "memory":
        with run_server(**settings) as one:
            yield [one, one]
        return
    assert redis is not None
    with run_server(session_store=redis.url, **settings) as a, run_server(session_store=redis.url, **settings) as b:
        yield [a, b]


def ws_generate(server: Server, key: str, session_id: str) -> dict[str, Any]:
    with connect(f"{server.ws_url}/v1/stream", subprotocols=[WS_PROTOCOL, WS_KEY_PREFIX + key]) as ws:  # type: ignore[list-item]
        ws.send(json.dumps({"type": "generate", "session_id": session_id, "max_new_chars": 3}))
        return json.loads(ws.recv(timeout=30))  # type: ignore[no-any-return]


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_another_keys_session_is_not_there(
    store: str, models_dir: Path, keys_file: Path, redis_server: RedisServer
) -> None:
    redis = redis_server if store == "redis" else None
    with two_servers(store, models_dir, keys_file, redis) as (a, b):
        with httpx.Client(base_url=a.base_url, timeout=30, headers=bearer(ALICE)) as alice:
            made = alice.post("/v1/sessions", json={"prompt": "ROMEO:", "seed": 3})
            assert made.status_code == 201, made.text
            sid = made.json()["id"]
        with httpx.Client(base_url=b.base_url, timeout=30, headers=bearer(BOB)) as bob:
            attempts = [
                bob.get(f"/v1/sessions/{sid}"),
                bob.post(f"/v1/sessions/{sid}/feed", json={"text": "O Romeo"}),
                bob.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 5}),
                bob.post(f"/v1/sessions/{sid}/fork", json={}),
                bob.post(f"/v1/sessions/{sid}/reset"),
                bob.post("/v1/generate", json={"session_id": sid, "max_new_chars": 5}),
                bob.post("/v1/completions", json={"model": "tiny-lstm", "prompt": "a", "session_id": sid}),
                bob.delete(f"/v1/sessions/{sid}"),
            ]
            unknown = bob.get("/v1/sessions/no-such-session").json()
        for r in attempts:
            assert r.status_code == 404, (r.request.url, r.text)
            # The same answer as for an id nobody made: nothing says the session exists.
            assert r.json()["error"]["message"].replace(sid, "X") == unknown["error"]["message"].replace(
                "no-such-session", "X"
            )
        refused = ws_generate(b, BOB, sid)
        assert refused["type"] == "error" and refused["code"] == "not_found"
        # The owner's session is as it was: Bob's attempts neither changed it nor held it up.
        with httpx.Client(base_url=b.base_url, timeout=30, headers=bearer(ALICE)) as alice:
            info = alice.get(f"/v1/sessions/{sid}")
            assert info.status_code == 200 and info.json()["history_chars"] == len("ROMEO:")
            r = alice.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 5})
            assert r.status_code == 200 and r.json()["session_id"] == sid
            assert ws_generate(b, ALICE, sid)["type"] == "text"
            assert alice.delete(f"/v1/sessions/{sid}").status_code == 204


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_key_holds_at_most_its_max_sessions(
    store: str, models_dir: Path, keys_file: Path, redis_server: RedisServer
) -> None:
    redis = redis_server if store == "redis" else None
    with two_servers(store, models_dir, keys_file, redis) as servers:

        def alice_on(i: int) -> httpx.Client:
            return httpx.Client(base_url=servers[i % 2].base_url, timeout=30, headers=bearer(ALICE))

        ids = []
        for i in range(ALICE_SESSIONS - 1):
            with alice_on(i) as alice:
                ids.append(alice.post("/v1/sessions", json={}).json()["id"])
        with alice_on(0) as alice:
            fork = alice.post(f"/v1/sessions/{ids[0]}/fork", json={})  # a fork is a session too
            assert fork.status_code == 201, fork.text
            for over in (alice.post("/v1/sessions", json={}), alice.post(f"/v1/sessions/{ids[0]}/fork", json={})):
                assert over.status_code == 429, over.text
                error = over.json()["error"]
                assert error["code"] == "too_many_sessions" and "'alice'" in error["message"]
                assert f"maximum of {ALICE_SESSIONS}" in error["message"] and int(over.headers["Retry-After"]) >= 1
        with httpx.Client(base_url=servers[1].base_url, timeout=30, headers=bearer(BOB)) as bob:
            assert bob.post("/v1/sessions", json={}).status_code == 201  # another key's cap is its own
        with alice_on(1) as alice:
            assert alice.delete(f"/v1/sessions/{ids[1]}").status_code == 204
            assert alice.post("/v1/sessions", json={}).status_code == 201  # the slot is free again
            assert alice.post("/v1/sessions", json={}).status_code == 429

"""The WebSocket protocol against a real server, with the `websockets` client."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.utils import Server


def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=30))  # type: ignore[no-any-return]


def until_final(ws: ClientConnection) -> tuple[str, dict[str, Any]]:
    texts = []
    while True:
        m = recv(ws)
        if m["type"] == "text":
            texts.append(m["text"])
        elif m["type"] != "session":  # a first generate announces the connection's session
            return "".join(texts), m


def test_generate_many_times_on_one_session(server: Server) -> None:
    with connect(f"{server.ws_url}/v1/stream") as ws:
        ws.send(json.dumps({"type": "generate", "prompt": "ROMEO:", "max_new_chars": 30, "seed": 4}))
        session = recv(ws)
        assert session["type"] == "session" and session["model"] == "tiny-lstm"
        first, done = until_final(ws)
        assert done == {
            "type": "done",
            "finish_reason": "length",
            "usage": {"prompt_chars": 6, "generated_chars": 30},
            "model": "tiny-lstm",
            "session_id": session["id"],
        }
        ws.send(json.dumps({"type": "generate", "max_new_chars": 30}))
        second, done2 = until_final(ws)
        assert done2["finish_reason"] == "length" and len(second) == 30
    # The connection's session is an ordinary session: same text as one long HTTP generation.
    with httpx.Client(base_url=server.base_url) as c:
        long = c.post("/v1/generate", json={"prompt": "ROMEO:", "max_new_chars": 60, "seed": 4}).json()["text"]
        assert first + second == long
        assert c.get(f"/v1/sessions/{session['id']}").json()["history_chars"] == 66


def test_feed_then_generate_and_attach_to_an_existing_session(server: Server) -> None:
    with httpx.Client(base_url=server.base_url) as c:
        sid = c.post("/v1/sessions", json={"seed": 2, "model": "tiny-gru"}).json()["id"]
    with connect(f"{server.ws_url}/v1/stream") as ws:
        ws.send(json.dumps({"type": "feed", "text": "KING:", "session_id": sid}))
        fed = recv(ws)
        assert fed == {
            "type": "fed",
            "session_id": sid,
            "history_chars": 5,
            "usage": {"prompt_chars": 5, "generated_chars": 0},
        }
        ws.send(json.dumps({"type": "generate", "max_new_chars": 20}))
        text, done = until_final(ws)
        assert done["session_id"] == sid and len(text) == 20


def test_cancel_stops_the_generation_and_the_connection_stays_usable(server: Server) -> None:
    with connect(f"{server.ws_url}/v1/stream") as ws:
        ws.send(json.dumps({"type": "generate", "prompt": "A", "max_new_chars": 100_000}))
        assert recv(ws)["type"] == "session"
        assert recv(ws)["type"] == "text"
        ws.send(json.dumps({"type": "cancel"}))
        _, done = until_final(ws)
        assert done["type"] == "done" and done["finish_reason"] == "cancelled"
        assert done["usage"]["generated_chars"] < 100_000
        ws.send(json.dumps({"type": "generate", "max_new_chars": 5}))
        text, done = until_final(ws)
        assert done["finish_reason"] == "length" and len(text) == 5


@pytest.mark.parametrize(
    ("message", "code", "fragment"),
    [
        ("this is not json", "invalid_json", "not JSON"),
        ("[1, 2]", "invalid_message", "JSON object with a 'type'"),
        ('{"type": "explode"}', "unknown_type", "unknown message type 'explode'"),
        ('{"type": "generate", "temperature": -3}', "invalid_input", "temperature"),
        ('{"type": "generate", "prompt": "€uro"}', "invalid_input", "'€'"),
        ('{"type": "generate", "model": "nope"}', "not_found", "does not exist"),
        ('{"type": "generate", "session_id": "nope"}', "not_found", "does not exist"),
        ('{"type": "generate", "max_new_chars": 999999}', "invalid_input", "the limit is 100000"),
        ('{"type": "feed"}', "invalid_input", "text"),
    ],
)
def test_bad_messages_get_an_error_and_the_connection_stays_usable(
    server: Server, message: str, code: str, fragment: str
) -> None:
    with connect(f"{server.ws_url}/v1/stream") as ws:
        ws.send(message)
        reply = recv(ws)
        while reply["type"] == "session":  # a valid generate may have made the session first
            reply = recv(ws)
        assert reply["type"] == "error" and reply["code"] == code and fragment in reply["message"], reply
        ws.send(json.dumps({"type": "generate", "max_new_chars": 3}))
        text, done = until_final(ws)
        assert done["type"] == "done" and len(text) == 3


def test_second_generate_while_busy_is_refused(server: Server) -> None:
    with connect(f"{server.ws_url}/v1/stream") as ws:
        ws.send(json.dumps({"type": "generate", "prompt": "A", "max_new_chars": 100_000}))
        recv(ws)
        ws.send(json.dumps({"type": "generate", "max_new_chars": 3}))
        while (m := recv(ws))["type"] == "text":
            pass
        assert m["type"] == "error" and m["code"] == "busy"
        ws.send(json.dumps({"type": "cancel"}))
        _, done = until_final(ws)
        assert done["finish_reason"] == "cancelled"


def test_disconnect_frees_the_generation(server: Server) -> None:
    scheduler = server.app.state.service.schedulers["tiny-lstm"]  # type: ignore[attr-defined]
    with connect(f"{server.ws_url}/v1/stream") as ws:
        ws.send(json.dumps({"type": "generate", "prompt": "A", "max_new_chars": 100_000}))
        sid = recv(ws)["id"]
        recv(ws)
    deadline = time.monotonic() + 5
    while scheduler.active:
        assert time.monotonic() < deadline, "generation kept running after the client left"
        time.sleep(0.01)
    with httpx.Client(base_url=server.base_url) as c:
        # The session is free again (not 409) and kept what was generated before the drop.
        r = c.post(f"/v1/sessions/{sid}/feed", json={"text": "b"})
        assert r.status_code == 200 and r.json()["session"]["history_chars"] < 100_000


def test_websocket_api_key(models_dir) -> None:  # type: ignore[no-untyped-def]
    from tests.utils import run_server

    with run_server(models_dir=models_dir, api_key="k") as s:
        with connect(f"{s.ws_url}/v1/stream") as ws:
            m = recv(ws)
            assert m["type"] == "error" and m["code"] == "unauthorized"
        with connect(f"{s.ws_url}/v1/stream?api_key=k") as ws:  # proxies log query strings: refused
            m = recv(ws)
            assert m["code"] == "unauthorized" and "not in the query string" in m["message"]
        with connect(f"{s.ws_url}/v1/stream", subprotocols=["charstream", "charstream.key.k"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "charstream"
            ws.send(json.dumps({"type": "generate", "max_new_chars": 3}))
            assert recv(ws)["type"] == "session"
        with connect(f"{s.ws_url}/v1/stream", additional_headers={"Authorization": "Bearer k"}) as ws:
            ws.send(json.dumps({"type": "generate", "max_new_chars": 3}))
            assert recv(ws)["type"] == "session"


def test_an_open_connection_keeps_its_session_alive(models_dir) -> None:  # type: ignore[no-untyped-def]
    from tests.utils import run_server

    with run_server(models_dir=models_dir, session_ttl_s=0.6) as s, connect(f"{s.ws_url}/v1/stream") as ws:
        ws.send(json.dumps({"type": "generate", "max_new_chars": 3}))
        session = recv(ws)
        until_final(ws)
        time.sleep(1.5)  # well past the TTL, with nothing sent
        ws.send(json.dumps({"type": "generate", "max_new_chars": 3}))
        text, done = until_final(ws)
        assert done["type"] == "done" and done["session_id"] == session["id"] and len(text) == 3


def test_a_session_deleted_elsewhere_is_replaced_and_announced(server: Server) -> None:
    with connect(f"{server.ws_url}/v1/stream") as ws:
        ws.send(json.dumps({"type": "generate", "max_new_chars": 3}))
        first = recv(ws)
        until_final(ws)
        with httpx.Client(base_url=server.base_url) as c:
            assert c.delete(f"/v1/sessions/{first['id']}").status_code == 204
        ws.send(json.dumps({"type": "generate", "max_new_chars": 3}))
        announced = recv(ws)
        assert announced["type"] == "session" and announced["replaces"] == first["id"]
        text, done = until_final(ws)
        assert done["session_id"] == announced["id"] != first["id"] and len(text) == 3

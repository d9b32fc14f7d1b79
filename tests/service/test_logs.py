"""No secret reaches a log line: neither the key a WebSocket sends as its subprotocol nor one an old client
still puts in the query string (refused, and redacted)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from websockets.sync.client import connect

from service.api.auth import WS_KEY_PREFIX, WS_PROTOCOL
from service.logs import RedactSecrets, redact
from tests.utils import serve_process


def test_redact_blanks_secret_query_parameters() -> None:
    assert redact("/v1/stream?api_key=s3cret&x=1") == "/v1/stream?api_key=[redacted]&x=1"
    assert redact('GET /v1/stream?token=abc HTTP/1.1"') == 'GET /v1/stream?token=[redacted] HTTP/1.1"'
    assert redact("/v1/models") == "/v1/models"
    record = logging.LogRecord("uvicorn.access", 20, "", 0, '%s - "%s %s"', ("1.2.3.4", "GET", "/?api_key=k"), None)
    assert RedactSecrets().filter(record) and "k" not in record.getMessage().split("api_key=")[1]


def test_redact_blanks_keys_in_headers_and_subprotocols_and_session_ids_in_paths() -> None:
    assert redact("< authorization: Bearer s3cret") == "< authorization: [redacted]"
    assert redact("< X-API-Key: s3cret") == "< X-API-Key: [redacted]"
    assert redact("< sec-websocket-protocol: charstream, charstream.key.s3cret") == (
        "< sec-websocket-protocol: charstream, charstream.key.[redacted]"
    )
    assert redact('"POST /v1/sessions/AbC-12_x/feed HTTP/1.1" 200') == '"POST /v1/sessions/[id]/feed HTTP/1.1" 200'
    assert redact('"POST /v1/sessions HTTP/1.1" 200') == '"POST /v1/sessions HTTP/1.1" 200'
    # A header's name and value come as separate arguments; the filter redacts the formatted line.
    record = logging.LogRecord("websockets", 10, "", 0, "< %s: %s", ("Authorization", "Bearer s3cret"), None)
    assert RedactSecrets().filter(record) and "s3cret" not in record.getMessage()


def test_the_api_key_never_reaches_the_server_log(models_dir: Path, tmp_path: Path) -> None:
    secret = "very-secret-key-42"
    with serve_process(
        tmp_path / "server.log",
        CHARSTREAM_MODELS_DIR=str(models_dir),
        CHARSTREAM_API_KEY=secret,
        CHARSTREAM_LOG_LEVEL="debug",
    ) as server:
        with connect(f"{server.ws_url}/v1/stream", subprotocols=[WS_PROTOCOL, WS_KEY_PREFIX + secret]) as ws:  # type: ignore[list-item]
            ws.send(json.dumps({"type": "generate", "max_new_chars": 3}))
            while json.loads(ws.recv(timeout=30))["type"] != "done":
                pass
        with connect(f"{server.ws_url}/v1/stream?api_key={secret}") as ws:
            assert json.loads(ws.recv(timeout=30))["code"] == "unauthorized"
        with server.client(headers={"authorization": f"Bearer {secret}"}) as c:
            session_id = c.post("/v1/sessions", json={}).json()["id"]
            assert c.post(f"/v1/sessions/{session_id}/feed", json={"text": "ROMEO:"}).status_code == 200
        server.proc.terminate()
        server.proc.wait(timeout=30)
    log = server.log.read_text()
    assert "/v1/stream" in log  # the lines were written, with the key blanked
    assert secret not in log, log
    assert "/v1/sessions/[id]/feed" in log and session_id not in log, log

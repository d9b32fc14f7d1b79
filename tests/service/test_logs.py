"""No secret reaches a log line: the WebSocket API key in a query string is redacted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from websockets.sync.client import connect

from service.logs import RedactSecrets, redact
from tests.utils import serve_process


def test_redact_blanks_secret_query_parameters() -> None:
    assert redact("/v1/stream?api_key=s3cret&x=1") == "/v1/stream?api_key=[redacted]&x=1"
    assert redact('GET /v1/stream?token=abc HTTP/1.1"') == 'GET /v1/stream?token=[redacted] HTTP/1.1"'
    assert redact("/v1/models") == "/v1/models"
    record = logging.LogRecord("uvicorn.access", 20, "", 0, '%s - "%s %s"', ("1.2.3.4", "GET", "/?api_key=k"), None)
    assert RedactSecrets().filter(record) and "k" not in record.getMessage().split("api_key=")[1]


def test_the_api_key_never_reaches_the_server_log(models_dir: Path, tmp_path: Path) -> None:
    secret = "very-secret-key-42"
    with serve_process(
        tmp_path / "server.log",
        CHARSTREAM_MODELS_DIR=str(models_dir),
        CHARSTREAM_API_KEY=secret,
        CHARSTREAM_LOG_LEVEL="debug",
    ) as server:
        with connect(f"{server.ws_url}/v1/stream?api_key={secret}") as ws:
            ws.send(json.dumps({"type": "generate", "max_new_chars": 3}))
            while json.loads(ws.recv(timeout=30))["type"] != "done":
                pass
        with connect(f"{server.ws_url}/v1/stream?api_key=wrong-{secret}") as ws:
            assert json.loads(ws.recv(timeout=30))["code"] == "unauthorized"
        server.proc.terminate()
        server.proc.wait(timeout=30)
    log = server.log.read_text()
    assert "/v1/stream" in log  # the lines were written, with the key blanked
    assert secret not in log, log

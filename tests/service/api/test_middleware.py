"""The connection limit against a real server: past CHARSTREAM_MAX_CONNECTIONS an HTTP request gets
429 with Retry-After and a WebSocket a close with 1013, the probes stay reachable, the refusals are
counted, and a slot comes back when its connection ends."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from service.server import SPARE_FDS, fit_file_limit
from tests.utils import run_server


def test_past_the_limit_http_gets_429_and_a_websocket_1013(models_dir: Path) -> None:
    with run_server(models_dir=models_dir, default_model="tiny-lstm", max_connections=2) as server:
        with connect(f"{server.ws_url}/v1/stream"), connect(f"{server.ws_url}/v1/stream"), server.client() as http:
            refused = http.get("/v1/sessions/nobody")
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "too_many_connections"
            assert "2 open connections" in refused.json()["error"]["message"]
            assert http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200
            with connect(f"{server.ws_url}/v1/stream") as third, pytest.raises(ConnectionClosed) as closed:
                third.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            metrics = http.get("/metrics").text
            assert "charstream_refused_connections_total 2.0" in metrics
            assert "charstream_open_connections 2.0" in metrics
        with server.client() as http:  # both WebSockets closed: their slots come back
            deadline = time.monotonic() + 10
            while (answer := http.get("/v1/sessions/nobody")).status_code == 429 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert answer.status_code == 404


def test_every_ended_request_gives_its_slot_back(models_dir: Path) -> None:
    # A slot is given back just after the response's last byte is sent: wait for it, never assume it.
    with (
        run_server(models_dir=models_dir, default_model="tiny-lstm", max_connections=1) as server,
        server.client() as http,
    ):
        for body in ({"prompt": "a"}, {"prompt": "a", "stream": True}, {"prompt": 5}, {"prompt": "a"}):
            deadline = time.monotonic() + 10
            while (answer := http.post("/v1/generate", json={**body, "max_new_chars": 20})).status_code == 429:
                assert time.monotonic() < deadline, "a slot was never given back"
                time.sleep(0.02)
            assert answer.status_code in (200, 422)
        deadline = time.monotonic() + 10
        while "charstream_open_connections 0.0" not in http.get("/metrics").text:
            assert time.monotonic() < deadline, "connections still counted as open"
            time.sleep(0.02)


def test_the_file_limit_is_raised_to_fit_the_connections() -> None:
    assert fit_file_limit(1000) >= 1000 + SPARE_FDS

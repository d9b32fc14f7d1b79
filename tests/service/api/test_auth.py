"""Keys, scopes and the other front doors, against a real server: what a key may reach, how a
WebSocket presents its key and where it may come from, the body-size limit, and what a public
deployment can turn off."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.utils import Server, run_server

GENERATE_ONLY = "alice-generate-0123456789"
USER = "bob-every-user-scope-0123"
ADMIN = "admin-key-0123456789abcd"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=30))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def keyed(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text(f'[keys.alice]\nkey = "{GENERATE_ONLY}"\nscopes = ["generate"]\n\n[keys.bob]\nkey = "{USER}"\n')
    with run_server(
        models_dir=models_dir,
        keys_file=keys,
        admin_key=ADMIN,
        metrics_need_key=True,
        max_body_bytes=4096,
        allowed_origins="https://app.example",
    ) as server:
        yield server


def test_each_route_needs_its_scope(keyed: Server) -> None:
    with keyed.client() as c:
        assert c.post("/v1/generate", json={"max_new_chars": 2}, headers=bearer(GENERATE_ONLY)).status_code == 200
        for path, body in (("/v1/score", {"texts": ["a"]}), ("/v1/sessions", {})):
            r = c.post(path, json=body, headers=bearer(GENERATE_ONLY))
            assert r.status_code == 403 and "lacks the" in r.json()["error"]["message"]
            assert r.json()["error"]["message"].endswith("scope this route needs") and "alice" in r.text
            assert c.post(path, json=body, headers=bearer(USER)).status_code in (200, 201)
        # The user keys are no operators, the operator's key is no user.
        reload = "/v1/admin/models/tiny-lstm/reload"
        assert c.post(reload, headers=bearer(USER)).status_code == 403
        assert c.post(reload, headers=bearer(ADMIN)).json()["swapped"] is False
        assert c.post("/v1/generate", json={}, headers=bearer(ADMIN)).status_code == 403
        assert c.post("/v1/generate", json={}, headers=bearer("forged-key-0123456789")).status_code == 401
        # Any valid key may list the models.
        assert c.get("/v1/models", headers={"X-API-Key": GENERATE_ONLY}).status_code == 200


def test_metrics_behind_the_metrics_scope(keyed: Server) -> None:
    with keyed.client() as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=bearer(USER)).status_code == 403
        r = c.get("/metrics", headers=bearer(ADMIN))
        assert r.status_code == 200 and "charstream_" in r.text
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200  # probes stay open


def test_a_body_over_the_limit_is_refused_before_it_is_parsed(keyed: Server) -> None:
    big = json.dumps({"prompt": "a" * 5000, "max_new_chars": 1})
    with keyed.client(headers=bearer(USER)) as c:
        r = c.post("/v1/generate", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert "CHARSTREAM_MAX_BODY_BYTES" in r.json()["error"]["message"]

        def chunks(body: str) -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            data = body.encode()
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]

        r = c.post("/v1/generate", content=chunks(big), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        small = json.dumps({"prompt": "ROMEO:", "max_new_chars": 3})
        r = c.post("/v1/generate", content=chunks(small), headers={"content-type": "application/json"})
        assert r.status_code == 200 and len(r.json()["text"]) == 3
        # The OpenAI routes say it in OpenAI's shape (a 400, as vLLM answers every invalid request).
        r = c.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_large"


def test_the_websocket_takes_its_key_as_a_subprotocol_never_in_the_url(keyed: Server) -> None:
    url = f"{keyed.ws_url}/v1/stream"
    with connect(url, subprotocols=["charstream", f"charstream.key.{USER}"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "charstream"
        ws.send(json.dumps({"type": "generate", "max_new_chars": 3}))
        assert recv(ws)["type"] == "session"
    with connect(url, additional_headers=bearer(GENERATE_ONLY)) as ws:
        ws.send(json.dumps({"type": "generate", "max_new_chars": 3}))
        assert recv(ws)["type"] == "session"
    for refused, code in (
        (connect(url, subprotocols=["charstream", "charstream.key.wrong-key-012345"]), "unauthorized"),  # type: ignore[list-item]
        (connect(f"{url}?api_key={USER}"), "unauthorized"),  # even the right key: proxies log query strings
        (connect(url, additional_headers=bearer(ADMIN)), "permission_denied"),  # no generate scope
    ):
        with refused as ws:
            error = recv(ws)
            assert error["type"] == "error" and error["code"] == code


def test_a_websocket_from_another_sites_page_is_refused(keyed: Server) -> None:
    url = f"{keyed.ws_url}/v1/stream"
    host = keyed.base_url.removeprefix("http://")
    for origin, allowed in (
        ("https://evil.example", False),
        ("https://app.example", True),  # listed in CHARSTREAM_ALLOWED_ORIGINS
        (f"http://{host}", True),  # the server's own page
    ):
        with connect(url, origin=origin, additional_headers=bearer(USER)) as ws:  # type: ignore[arg-type]
            if allowed:
                ws.send(json.dumps({"type": "generate", "max_new_chars": 2}))
                assert recv(ws)["type"] == "session"
            else:
                error = recv(ws)
                assert error["code"] == "permission_denied" and "CHARSTREAM_ALLOWED_ORIGINS" in error["message"]


def test_without_keys_admin_routes_stay_closed(models_dir: Path) -> None:
    with run_server(models_dir=models_dir) as s, s.client() as c:
        r = c.post("/v1/admin/models/tiny-lstm/reload")
        assert r.status_code == 403 and "CHARSTREAM_ADMIN_KEY" in r.json()["error"]["message"]
        assert c.post("/v1/generate", json={"max_new_chars": 2}).status_code == 200


def test_docs_can_be_turned_off_and_the_page_sends_security_headers(models_dir: Path) -> None:
    with run_server(models_dir=models_dir, docs=False) as s, s.client() as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 404
        page = c.get("/")
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert c.get("/static/playground.js").headers["x-content-type-options"] == "nosniff"
    with run_server(models_dir=models_dir) as s:
        assert httpx.get(f"{s.base_url}/openapi.json").status_code == 200

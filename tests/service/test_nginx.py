"""The scaled deployment with real parts on loopback: nginx with deploy/nginx.conf in front of two
charstream processes that share sessions through a real redis-server. A session sticks to one
replica by its id (header or path), SSE and WebSockets stream through, a draining replica's
requests go to the other one, and a SIGKILLed replica's session continues on the other."""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.nginx_server import NginxServer
from tests.redis_server import RedisServer
from tests.utils import ServeProcess, free_port, run_server, serve_process

RETRYABLE = (409, 502, 503)


@dataclass
class Deployment:
    nginx: NginxServer
    replicas: list[ServeProcess]

    def client(self, session: str | None = None) -> httpx.Client:
        headers = {"X-Session-Id": session} if session else {}
        return httpx.Client(base_url=self.nginx.base_url, headers=headers, timeout=30)

    def replica_of(self, session: str) -> ServeProcess:
        """The replica that nginx routes the session to now, as /healthz's worker pid says."""
        with self.client(session) as c:
            pid = int(c.get("/healthz").json()["worker"])
        return next(r for r in self.replicas if r.proc.pid == pid)


@contextlib.contextmanager
def deployment(models_dir: Path, redis: RedisServer, folder: Path, replicas: int = 2) -> Iterator[Deployment]:
    settings = {
        "CHARSTREAM_MODELS_DIR": str(models_dir),
        "CHARSTREAM_DEFAULT_MODEL": "tiny-lstm",
        "CHARSTREAM_SESSION_STORE": redis.url,
        "CHARSTREAM_LEASE_TTL_S": "1",
        "CHARSTREAM_MAX_NEW_CHARS": "1000000",
        "CHARSTREAM_SHUTDOWN_GRACE_S": "5",
        "CHARSTREAM_LOG_JSON": "false",
    }
    with contextlib.ExitStack() as stack:
        started = [
            stack.enter_context(serve_process(folder / f"replica{i}.log", free_port(), **settings))
            for i in range(replicas)
        ]
        nginx = NginxServer(folder / "nginx", [int(r.base_url.rsplit(":", 1)[1]) for r in started]).start()
        stack.callback(nginx.stop)
        yield Deployment(nginx, started)


@pytest.fixture(scope="module")
def shared(
    models_dir: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """One deployment for the tests that leave it as they found it."""
    with deployment(models_dir, redis_server, tmp_path_factory.mktemp("shared")) as d:
        yield d


@pytest.fixture
def deployed(models_dir: Path, redis_server: RedisServer, tmp_path: Path) -> Iterator[Deployment]:
    """A deployment of its own, for a test that stops or kills a replica."""
    with deployment(models_dir, redis_server, tmp_path) as d:
        yield d


def sse_text(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    texts, final = [], {}
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            if "text" in event:
                texts.append(event["text"])
            else:
                final = event
    return "".join(texts), final


def generate_with_retries(d: Deployment, sid: str, body: dict[str, Any], attempts: int = 100) -> httpx.Response:
    """As a client should: 409, 502 and 503 are retried after their Retry-After (capped here)."""
    for _ in range(attempts):
        with d.client(sid) as c:
            r = c.post(f"/v1/sessions/{sid}/generate", json=body)
        if r.status_code not in RETRYABLE:
            return r
        time.sleep(min(float(r.headers.get("Retry-After", "1")), 1.0) / 4)
    raise AssertionError(f"no answer after {attempts} attempts")


def test_a_session_sticks_to_one_replica(shared: Deployment) -> None:
    d = shared
    by_session = {}
    for _ in range(16):
        sid = secrets.token_hex(8)
        with d.client(sid) as c:
            workers = {c.get("/healthz").json()["worker"] for _ in range(4)}
        assert len(workers) == 1
        by_session[sid] = workers.pop()
    assert len(set(by_session.values())) == 2  # the hash spreads session ids over both replicas
    with d.client() as c:  # no session id: requests spread over both replicas
        assert len({c.get("/healthz").json()["worker"] for _ in range(40)}) == 2

        # A real session: its path and its header route the same way, wherever it was created.
        sid = c.post("/v1/sessions", json={"prompt": "ROMEO:", "seed": 3}).json()["id"]
        before = len(d.nginx.routes())  # the log names no session: this client's requests are the next lines
        for _ in range(3):
            assert c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 10}).status_code == 200
        assert c.get(f"/v1/sessions/{sid}").json()["history_chars"] == 6 + 30
        body = {"session_id": sid, "max_new_chars": 10}
        assert c.post("/v1/generate", json=body, headers={"X-Session-Id": sid}).status_code == 200
    home = d.replica_of(sid)
    routed = d.nginx.routes()[before:]
    assert len(routed) == 3 + 1 + 1 + 1  # three generates, the info, the body-routed generate, /healthz
    assert {routed_by for _, routed_by, _ in routed} == {"session"}
    assert {upstream for _, _, upstream in routed} == {home.base_url.removeprefix("http://")}
    assert [request for request, _, _ in routed[:4]] == 3 * ["POST /v1/sessions/-/generate HTTP/1.1"] + [
        "GET /v1/sessions/- HTTP/1.1"
    ]


def test_the_access_log_names_no_session_and_no_key(shared: Deployment) -> None:
    """Session ids (in the path or the header) and keys (in a header, or wrongly in the query
    string) reach the replicas but never nginx's access log."""
    d = shared
    key = secrets.token_hex(16)
    with d.client() as c:
        sid = c.post("/v1/sessions", json={"seed": 1}, headers={"X-API-Key": key}).json()["id"]
        c.post(f"/v1/sessions/{sid}/generate?api_key={key}", json={"max_new_chars": 3}, headers={"X-Session-Id": sid})
        c.get(f"/v1/sessions/{sid}", params={"api_key": key}, headers={"Authorization": f"Bearer {key}"})
        c.post(f"/v1/sessions/{sid}/fork?api_key={key}", json={})
        c.get("/healthz", params={"api_key": key}, headers={"X-Session-Id": sid})
    log = d.nginx.access_log.read_text()
    assert sid not in log and key not in log and "api_key" not in log
    requests = [request for request, _, _ in d.nginx.routes()[-5:]]
    assert requests == [
        "POST /v1/sessions HTTP/1.1",
        "POST /v1/sessions/-/generate HTTP/1.1",
        "GET /v1/sessions/- HTTP/1.1",
        "POST /v1/sessions/-/fork HTTP/1.1",
        "GET /healthz HTTP/1.1",
    ]


def test_sse_and_websocket_stream_through_nginx(shared: Deployment) -> None:
    d = shared
    with d.client() as c:
        sid = c.post("/v1/sessions", json={"prompt": "KING:", "seed": 9}).json()["id"]
    with d.client(sid) as c:
        whole = c.post("/v1/generate", json={"prompt": "A", "max_new_chars": 200, "seed": 4}).json()["text"]
        with c.stream(
            "POST", "/v1/generate", json={"prompt": "A", "max_new_chars": 200, "seed": 4, "stream": True}
        ) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            text, final = sse_text(r)
        assert text == whole and final["finish_reason"] == "length"

        with c.stream("POST", f"/v1/sessions/{sid}/generate", json={"max_new_chars": 100, "stream": True}) as r:
            text, final = sse_text(r)
        assert len(text) == 100 and final["session_id"] == sid

        # A client that leaves a long stream early frees its session: the next call is not refused as busy.
        with c.stream("POST", f"/v1/sessions/{sid}/generate", json={"max_new_chars": 1_000_000, "stream": True}) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n == 20:
                    break
        r = generate_with_retries(d, sid, {"max_new_chars": 5})
        assert r.status_code == 200 and len(r.json()["text"]) == 5

    with connect(f"{d.nginx.ws_url}/v1/stream", additional_headers={"X-Session-Id": sid}) as ws:
        for n in (20, 30):  # two generations on one connection, on the same session
            ws.send(json.dumps({"type": "generate", "session_id": sid, "max_new_chars": n}))
            texts, done = [], None
            while done is None:
                m = json.loads(ws.recv(timeout=30))
                if m["type"] == "text":
                    texts.append(m["text"])
                elif m["type"] in ("done", "error"):
                    done = m
            assert done["type"] == "done" and len("".join(texts)) == n
    with d.client(sid) as c:
        info = c.get(f"/v1/sessions/{sid}").json()
    assert info["history_chars"] >= 5 + 100 + 20 + 5 + 20 + 30  # plus what the abandoned stream made


def test_a_draining_replica_hands_its_requests_to_the_other(deployed: Deployment) -> None:
    d = deployed
    with d.client() as c:
        sids = [c.post("/v1/sessions", json={"seed": i}).json()["id"] for i in range(12)]
    draining = d.replica_of(sids[0])
    mine = [sid for sid in sids if d.replica_of(sid) is draining]
    for sid in mine:  # nginx keeps connections open to the replica these sessions hash to
        assert generate_with_retries(d, sid, {"max_new_chars": 5}).status_code == 200
    long = {"max_new_chars": 1_000_000, "stream": True}
    with d.client(mine[0]) as c, c.stream("POST", "/v1/generate", json=long) as s:  # keeps it draining a while
        # SIGTERM: the replica stops listening and answers what still reaches it with 503 +
        # Retry-After before any work; nginx passes those requests, POSTs included, to the other one.
        draining.proc.send_signal(signal.SIGTERM)
        for sid in mine:
            with d.client(sid) as c2:
                r = c2.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 5})
            assert r.status_code == 200, r.text
        with contextlib.suppress(httpx.HTTPError):
            for _ in s.iter_lines():  # the running stream ends, at the latest after the grace period
                pass
    code = draining.proc.wait(timeout=30)
    assert code in (0, -signal.SIGTERM), draining.log.read_text()[-3000:]
    for sid in mine:
        r = generate_with_retries(d, sid, {"max_new_chars": 5})
        assert r.status_code == 200
    assert "Traceback" not in draining.log.read_text()


def test_sigkill_a_replica_and_the_session_continues_on_the_other(deployed: Deployment, models_dir: Path) -> None:
    d = deployed
    with run_server(models_dir=models_dir, default_model="tiny-lstm") as one, one.client() as c:
        ref = c.post("/v1/sessions", json={"prompt": "KING:", "seed": 5}).json()["id"]
        first = c.post(f"/v1/sessions/{ref}/generate", json={"max_new_chars": 50, "temperature": 0}).json()["text"]
        second = c.post(f"/v1/sessions/{ref}/generate", json={"max_new_chars": 40, "temperature": 0}).json()["text"]

    with d.client() as c:
        sid = c.post("/v1/sessions", json={"prompt": "KING:", "seed": 5}).json()["id"]
    victim = d.replica_of(sid)
    survivor = next(r for r in d.replicas if r is not victim)
    with d.client(sid) as c:
        r = c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 50, "temperature": 0})
        assert r.json()["text"] == first
        cut = False
        with c.stream("POST", f"/v1/sessions/{sid}/generate", json={"max_new_chars": 1_000_000, "stream": True}) as s:
            try:
                for n, _ in enumerate(s.iter_lines()):
                    if n == 20:
                        victim.proc.send_signal(signal.SIGKILL)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                cut = True
        assert cut
    # Through nginx again: the dead replica is passed over, and once its lease lapses the other
    # replica continues from the state saved before the killed request.
    r = generate_with_retries(d, sid, {"max_new_chars": 40, "temperature": 0})
    assert r.status_code == 200 and r.json()["text"] == second
    assert d.replica_of(sid) is survivor
    with d.client(sid) as c:
        assert c.get(f"/v1/sessions/{sid}").json()["history_chars"] == 5 + 50 + 40

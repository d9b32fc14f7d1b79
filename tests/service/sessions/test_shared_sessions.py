"""Sessions shared through a real Redis by real server processes: any replica or worker continues
any session with exactly the text one process would give, a SIGKILLed replica loses only the
request it was running, a rolling restart loses nothing, and a Redis outage is a clear 503 that
heals by itself."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import RedisError

from service.sessions.record import encode
from service.sessions.redis_store import redacted
from service.sessions.store import Session
from tests.redis_server import RedisServer
from tests.utils import ServeProcess, free_port, run_server, serve_process

LEASE_TTL_S = 1.0


@contextlib.contextmanager
def replica(
    models_dir: Path, redis: RedisServer, log: Path, port: int | None = None, **env: str
) -> Iterator[ServeProcess]:
    settings = {
        "CHARSTREAM_MODELS_DIR": str(models_dir),
        "CHARSTREAM_DEFAULT_MODEL": "tiny-lstm",
        "CHARSTREAM_SESSION_STORE": redis.url,
        "CHARSTREAM_LEASE_TTL_S": str(LEASE_TTL_S),
        "CHARSTREAM_MAX_NEW_CHARS": "1000000",
        "CHARSTREAM_SHUTDOWN_GRACE_S": "5",
        "CHARSTREAM_LOG_JSON": "false",
    } | env
    with serve_process(log, port, **settings) as server:
        yield server


CALLS: list[dict[str, Any]] = [
    {"prompt": "ROMEO:", "max_new_chars": 30, "temperature": 0.8},
    {"max_new_chars": 30, "temperature": 0.8, "top_k": 10},
    {"prompt": "\nJULIET:", "max_new_chars": 30},
    {"max_new_chars": 20, "temperature": 0},
]


def calls(base_urls: list[str], sid: str, bodies: list[dict[str, Any]] = CALLS) -> list[str]:
    """The same sequence of calls on one session, each through the next server in turn."""
    texts = []
    for i, body in enumerate(bodies):
        with httpx.Client(base_url=base_urls[i % len(base_urls)], timeout=30) as c:
            r = c.post(f"/v1/sessions/{sid}/generate", json=body)
            assert r.status_code == 200, r.text
            texts.append(r.json()["text"])
    return texts


def reference_texts(models_dir: Path) -> list[str]:
    with run_server(models_dir=models_dir, default_model="tiny-lstm") as one, one.client() as c:
        sid = c.post("/v1/sessions", json={"seed": 77}).json()["id"]
        return calls([one.base_url], sid)


def test_any_replica_continues_any_session_exactly(models_dir: Path, redis_server: RedisServer, tmp_path: Path) -> None:
    expected = reference_texts(models_dir)
    with (
        replica(models_dir, redis_server, tmp_path / "a.log") as a,
        replica(models_dir, redis_server, tmp_path / "b.log") as b,
    ):
        with httpx.Client(base_url=a.base_url) as c:
            sid = c.post("/v1/sessions", json={"seed": 77}).json()["id"]
        assert calls([a.base_url, b.base_url], sid) == expected
        with httpx.Client(base_url=b.base_url) as c:
            info = c.get(f"/v1/sessions/{sid}").json()
        assert info["history_chars"] == 6 + 30 + 30 + 8 + 30 + 20


def test_sessions_survive_a_restart_of_a_persistent_redis(models_dir: Path, tmp_path: Path) -> None:
    """With an append-only file (as compose.scale.yaml runs Redis), a restart on the same data
    directory keeps every session: it continues to exactly the text an uninterrupted one gives."""
    expected = reference_texts(models_dir)
    redis = RedisServer(tmp_path / "aof", appendonly=True).start()
    try:
        with replica(models_dir, redis, tmp_path / "r.log") as server:
            with httpx.Client(base_url=server.base_url) as c:
                sid = c.post("/v1/sessions", json={"seed": 77}).json()["id"]
            before = calls([server.base_url], sid, CALLS[:2])
            redis.stop()  # SIGTERM: what a container restart sends
            with pytest.raises(RedisError):  # really down: nothing is kept in a process
                redis.client().ping()
            assert any((tmp_path / "aof").rglob("*.aof")), "no append-only file was written"
            redis.start()
            after = calls([server.base_url], sid, CALLS[2:])
        assert before + after == expected
    finally:
        redis.stop()


def test_workers_share_one_port_and_every_session(models_dir: Path, redis_server: RedisServer, tmp_path: Path) -> None:
    expected = reference_texts(models_dir)
    with replica(models_dir, redis_server, tmp_path / "w.log", CHARSTREAM_WORKERS="2") as server:
        workers = set()
        deadline = time.monotonic() + 30
        while len(workers) < 2 and time.monotonic() < deadline:  # each new connection may land on either
            with httpx.Client(base_url=server.base_url) as c:
                workers.add(c.get("/healthz").json()["worker"])
        assert len(workers) == 2
        with httpx.Client(base_url=server.base_url) as c:
            sid = c.post("/v1/sessions", json={"seed": 77}).json()["id"]
        assert calls([server.base_url], sid) == expected
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
    assert "Traceback" not in server.log.read_text()


def test_memory_store_with_several_workers_is_refused(models_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    with (
        pytest.raises(RuntimeError, match="needs a shared session store"),
        serve_process(log, CHARSTREAM_MODELS_DIR=str(models_dir), CHARSTREAM_WORKERS="2"),
    ):
        pass


def generate_with_retries(base_url: str, sid: str, body: dict[str, Any], attempts: int = 50) -> httpx.Response:
    """As a client should: 409 and 503 carry Retry-After; a refused connection means try again."""
    for _ in range(attempts):
        try:
            with httpx.Client(base_url=base_url, timeout=30) as c:
                r = c.post(f"/v1/sessions/{sid}/generate", json=body)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            time.sleep(0.1)
            continue
        if r.status_code in (409, 503):
            time.sleep(min(float(r.headers.get("Retry-After", "1")), 1.0) / 4)
            continue
        return r
    raise AssertionError(f"no answer after {attempts} attempts")


def test_sigkill_mid_stream_loses_only_that_request(
    models_dir: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    with run_server(models_dir=models_dir, default_model="tiny-lstm") as one, one.client() as c:
        sid = c.post("/v1/sessions", json={"prompt": "KING:", "seed": 5}).json()["id"]
        first = c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 50, "temperature": 0}).json()["text"]
        second = c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 40, "temperature": 0}).json()["text"]
    with (
        replica(models_dir, redis_server, tmp_path / "a.log") as a,
        replica(models_dir, redis_server, tmp_path / "b.log") as b,
    ):
        with httpx.Client(base_url=a.base_url, timeout=30) as c:
            sid = c.post("/v1/sessions", json={"prompt": "KING:", "seed": 5}).json()["id"]
            r = c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 50, "temperature": 0})
            assert r.json()["text"] == first
            cut = False
            with c.stream(
                "POST", f"/v1/sessions/{sid}/generate", json={"max_new_chars": 1_000_000, "stream": True}
            ) as s:
                try:
                    for n, _ in enumerate(s.iter_lines()):
                        if n == 20:
                            a.proc.send_signal(signal.SIGKILL)
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    cut = True
            assert cut
        # Another replica continues from the state saved before the killed request, once its lease lapses.
        r = generate_with_retries(b.base_url, sid, {"max_new_chars": 40, "temperature": 0})
        assert r.status_code == 200 and r.json()["text"] == second
        with httpx.Client(base_url=b.base_url) as c:
            assert c.get(f"/v1/sessions/{sid}").json()["history_chars"] == 5 + 50 + 40


def test_rolling_restart_loses_no_session(models_dir: Path, redis_server: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    clients, chars = 50, 10
    stop = threading.Event()
    done: dict[str, int] = {}
    failures: list[str] = []

    def client(sid: str) -> None:
        try:
            while not stop.is_set():
                r = generate_with_retries(f"http://127.0.0.1:{port}", sid, {"max_new_chars": chars})
                if r.status_code != 200:
                    failures.append(r.text)
                    return
                done[sid] += chars
        except Exception as exc:  # a hang shows up as a timeout here
            failures.append(repr(exc))

    reuse = {"CHARSTREAM_REUSE_PORT": "true"}
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(replica(models_dir, redis_server, tmp_path / "a.log", port, **reuse))
        second = stack.enter_context(replica(models_dir, redis_server, tmp_path / "b.log", port, **reuse))
        with httpx.Client(base_url=first.base_url) as c:
            sids = [c.post("/v1/sessions", json={"prompt": "A:", "seed": i}).json()["id"] for i in range(clients)]
        done.update(dict.fromkeys(sids, 0))
        threads = [threading.Thread(target=client, args=(sid,)) for sid in sids]
        for t in threads:
            t.start()
        time.sleep(1.0)
        for i, old in enumerate((first, second)):
            old.proc.send_signal(signal.SIGTERM)  # the other replica keeps the port served meanwhile
            assert old.proc.wait(timeout=30) in (0, -signal.SIGTERM)
            stack.enter_context(replica(models_dir, redis_server, tmp_path / f"new{i}.log", port, **reuse))
            time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads) and not failures, failures[:3]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            for sid in sids:
                info = c.get(f"/v1/sessions/{sid}").json()
                assert info["history_chars"] == 2 + done[sid], (sid, info, done[sid])
    assert sum(done.values()) > clients * chars
    for log in tmp_path.glob("*.log"):
        assert "Traceback" not in log.read_text(), log


def test_redis_outage_is_a_clear_503_and_heals(models_dir: Path, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        with replica(models_dir, redis, tmp_path / "a.log") as a, httpx.Client(base_url=a.base_url, timeout=30) as c:
            assert c.post("/v1/sessions", json={}).status_code == 201
            redis.stop()
            r = c.post("/v1/sessions", json={})
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert (
                r.json()["error"]["code"] == "store_unavailable"
                and redacted(redis.url).split("/0")[0] in r.json()["error"]["message"]
            )
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["session_store"]["error"]
            assert c.post("/v1/generate", json={"max_new_chars": 5}).status_code == 200  # stateless still works
            redis.start()  # same port, empty (no persistence): the server reconnects by itself
            deadline = time.monotonic() + 30
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert c.post("/v1/sessions", json={}).status_code == 201
        assert redis.password not in (tmp_path / "a.log").read_text()  # the outage's log lines included
    finally:
        redis.stop()


def test_corrupt_and_foreign_records_get_410_and_409(
    models_dir: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    with replica(models_dir, redis_server, tmp_path / "a.log") as a, httpx.Client(base_url=a.base_url) as c:
        sid = c.post("/v1/sessions", json={}).json()["id"]
        with redis_server.client() as r:
            key = f"charstream:{{{sid}}}:rec"
            r.set(key, b"not a record")
            gone = c.get(f"/v1/sessions/{sid}")
            assert gone.status_code == 410 and gone.json()["error"]["code"] == "session_corrupt"
            assert c.post(f"/v1/sessions/{sid}/generate", json={}).status_code == 410
            foreign = Session.fresh("tiny-lstm", (2, 48), 2, 1)
            r.set(key, encode(foreign, "0" * 64))  # made by another file of the same model name
            other = c.post(f"/v1/sessions/{sid}/generate", json={})
            assert other.status_code == 409 and other.json()["error"]["code"] == "session_model_mismatch"
            assert "another version" in other.json()["error"]["message"]


def test_deployments_with_their_own_prefix_share_a_redis_but_nothing_else(
    models_dir: Path, redis_server: RedisServer
) -> None:
    common = {"models_dir": models_dir, "session_store": redis_server.url, "requests_per_s": 0.02}
    before = set(redis_server.client().keys("*"))
    with (
        run_server(redis_prefix="blue", **common) as blue,
        run_server(redis_prefix="green", **common) as green,
        blue.client() as b,
        green.client() as g,
    ):
        sid = b.post("/v1/sessions", json={}).json()["id"]
        assert g.get(f"/v1/sessions/{sid}").status_code == 404  # another deployment's session
        assert g.post("/v1/sessions", json={}).status_code == 429  # its own request limit: one so far
        assert b.get(f"/v1/sessions/{sid}").status_code == 429  # blue's count is blue's
    written = [k.decode() for k in set(redis_server.client().keys("*")) - before]
    assert written and all(k.startswith(("blue", "green")) for k in written), written
    assert any(k.startswith("blue:") for k in written) and any(k.startswith("blue-limits") for k in written)

"""Sessions through Redis Sentinel with real processes on loopback: the URL is checked at start-up,
fencing tokens never go backwards, and 50 clients keep continuing their sessions while the primary
is SIGKILLed. During the switch they get 503 store_unavailable (or 409 session_busy for a lease a
lost request left) with Retry-After; the server finds the promoted replica by itself; with
CHARSTREAM_REDIS_WAIT_REPLICAS=1 every session whose done event a client saw continues from
exactly that state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.errors import ServiceConfigError, StoreUnavailable
from service.sessions.redis_store import RedisSessionStore, check_credentials
from service.sessions.store import Session
from service.settings import load_settings, parse_sentinel_url
from tests.redis_sentinel import SentinelGroup, wait_for
from tests.redis_server import RedisServer
from tests.utils import run_server

CLIENTS = 50
NEW_CHARS = 4
BODY = {"max_new_chars": NEW_CHARS, "temperature": 0.8}
MODELS = {"m": "a" * 64}


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    # Two replicas: after the primary dies, one is promoted and the other still confirms WAIT 1.
    sentinels = SentinelGroup(tmp_path / "sentinel", replicas=2).start()
    try:
        yield sentinels
    finally:
        sentinels.stop()


def test_sentinel_urls_are_checked_at_start_up() -> None:
    address = parse_sentinel_url("redis+sentinel://:pw@10.0.0.1:26379,[::1]:26380/main/3")
    assert address.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert (address.service, address.db, address.password) == ("main", 3, "pw")
    assert "pw" not in address.describe()
    assert parse_sentinel_url("redis+sentinel://h:1/s").db == 0
    for bad, says in [
        ("redis+sentinel://h:1", "name the primary's service"),
        ("redis+sentinel://h/s", "each sentinel is host:port"),
        ("redis+sentinel://h:1,h:x/s", "each sentinel is host:port"),
        ("redis+sentinel://h:1/s/zero", "must be a number"),
        ("redis+sentinel://h:1/s/0/extra", "name the primary's service"),
    ]:
        with pytest.raises(ServiceConfigError, match=says) as err:
            load_settings(session_store=bad)
        assert str(err.value).startswith("CHARSTREAM_SESSION_STORE: ") and "\n" not in str(err.value)
    with pytest.raises(ServiceConfigError, match="REDIS_WAIT_REPLICAS=1 needs a Redis session store"):
        load_settings(redis_wait_replicas=1)


def test_the_password_reaches_the_sentinels_and_the_primary(group: SentinelGroup) -> None:
    """Sentinels and data servers share one password (requirepass on both): the URL's reaches the
    sentinels' own connections and the primary's; without it, or with a wrong one, the start-up
    stops with one line that does not echo it."""
    check_credentials(group.url)

    async def scenario() -> None:
        store = RedisSessionStore(group.url, ttl_s=30, max_sessions=10, lease_ttl_s=5, models=MODELS, prefix="pw")
        s = Session.fresh("m", (2, 8), 2, 1)
        await store.create(s)
        assert (await store.get(s.id)).id == s.id
        await store.close()

    asyncio.run(scenario())
    plain = group.url.replace(f":{group.password}@", "")
    wrong = group.url.replace(group.password, "not-the-password")
    for url, says in [(plain, "needs a password"), (wrong, "refused the password")]:
        with pytest.raises(ServiceConfigError, match=says) as refused:
            check_credentials(url, timeout_s=1)
        message = str(refused.value)
        assert message.startswith("CHARSTREAM_SESSION_STORE: the session store redis+sentinel://"), message
        assert "\n" not in message and group.password not in message and "not-the-password" not in message


def test_tokens_never_go_backwards_when_a_replica_missed_them(redis_server: RedisServer) -> None:
    """A promoted replica that missed the last leases has an older (or no) fence key: the next
    token still exceeds every token given before, so the old holder stays fenced out."""

    async def scenario() -> None:
        store = RedisSessionStore(
            redis_server.url, ttl_s=30, max_sessions=10, lease_ttl_s=5, models=MODELS, prefix=f"f{time.monotonic_ns()}"
        )
        s = Session.fresh("m", (2, 8), 2, 1)
        await store.create(s)
        _, first = await store.lease(s.id)
        await store.release(first)
        _, old = await store.lease(s.id)
        # What a replica that missed `old` would hold: no lease and the fence of `first`.
        await store.client.delete(store._keys(s.id, "")[1])
        await store.client.set(store._keys(s.id, "")[2], first.token)
        _, new = await store.lease(s.id)
        assert new.token > old.token > first.token
        s.history_chars = 5
        assert not await store.save(s, old)  # the old holder is still fenced out
        assert await store.save(s, new)
        await store.close()

    asyncio.run(scenario())


def test_wait_replicas_refuses_what_no_replica_confirmed(redis_server: RedisServer) -> None:
    """A lone server has no replica to confirm a write: 503, and a lease it took is given back."""

    async def scenario() -> None:
        prefix = f"w{time.monotonic_ns()}"
        plain = RedisSessionStore(
            redis_server.url, ttl_s=30, max_sessions=10, lease_ttl_s=5, models=MODELS, prefix=prefix
        )
        waiting = RedisSessionStore(
            redis_server.url, ttl_s=30, max_sessions=10, lease_ttl_s=5, models=MODELS, prefix=prefix, wait_replicas=1
        )
        s = Session.fresh("m", (2, 8), 2, 1)
        await plain.create(s)
        with pytest.raises(StoreUnavailable, match="confirmed the write on 0 of 1 replicas"):
            await waiting.lease(s.id)
        _, lease = await plain.lease(s.id)  # not left busy by the unconfirmed lease
        await plain.release(lease)
        with pytest.raises(StoreUnavailable, match="0 of 1"):
            await waiting.create(Session.fresh("m", (2, 8), 2, 2))
        await plain.close()
        await waiting.close()

    asyncio.run(scenario())


@dataclass
class Client:
    """One client's view of its session: the history its last done event vouches for."""

    session_id: str
    seen: int = 0  # history_chars the session has as of the last done event seen
    ok: int = 0
    ok_after_switch: int = 0
    refusals: list[tuple[int, str, str | None]] = field(default_factory=list)  # status, code, Retry-After


async def history(http: httpx.AsyncClient, sid: str) -> int:
    """The stored history length, asked until the store answers (for at most a minute)."""
    deadline = time.monotonic() + 60
    while True:
        r = await http.get(f"/v1/sessions/{sid}")
        if r.status_code == 200:
            return int(r.json()["history_chars"])
        assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
        assert time.monotonic() < deadline, "the store did not answer within a minute"
        await asyncio.sleep(0.05)


async def keep_continuing(
    http: httpx.AsyncClient, me: Client, step: int, stop: asyncio.Event, switched: asyncio.Event
) -> None:
    while not stop.is_set():
        r = await http.post(f"/v1/sessions/{me.session_id}/generate", json=BODY)
        if r.status_code == 200:
            assert r.json()["finish_reason"] == "length"
            me.seen += step
            me.ok += 1
            me.ok_after_switch += switched.is_set()
            continue
        code = r.json()["error"]["code"]
        me.refusals.append((r.status_code, code, r.headers.get("Retry-After")))
        if code == "store_unavailable":
            # The request may have been saved before its answer was lost: the state is the one the
            # client saw, or one request further; never older. Under WAIT a read is confirmed like a
            # write, so what it reads is what the store keeps.
            now = await history(http, me.session_id)
            assert now in (me.seen, me.seen + step), (me.session_id, now, me.seen)
            me.seen = now
        await asyncio.sleep(0.05)  # the Retry-After is 1 s; a client retrying sooner tests more


@pytest.mark.timeout(120)
def test_clients_continue_through_a_primary_sigkill(models_dir: Path, group: SentinelGroup) -> None:
    with run_server(
        models_dir=models_dir,
        default_model="tiny-lstm",
        session_store=group.url,
        redis_wait_replicas=1,
        lease_ttl_s=1.0,
    ) as server:

        async def scenario() -> list[Client]:
            # Idle pooled connections expire before the server's keep-alive (5 s) can close them under a request.
            limits = httpx.Limits(max_connections=CLIENTS + 10, keepalive_expiry=1)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30, limits=limits) as http:
                clients = []
                for _ in range(CLIENTS):
                    r = await http.post("/v1/sessions", json={"prompt": "ROMEO:"})
                    assert r.status_code == 201, r.text
                    clients.append(Client(r.json()["id"], seen=r.json()["history_chars"]))
                # How far one request moves a session's history (the same for every request here).
                first = clients[0]
                r = await http.post(f"/v1/sessions/{first.session_id}/generate", json=BODY)
                assert r.status_code == 200, r.text
                step = await history(http, first.session_id) - first.seen
                first.seen += step
                assert step > 0

                stop, switched = asyncio.Event(), asyncio.Event()
                tasks = [asyncio.create_task(keep_continuing(http, c, step, stop, switched)) for c in clients]
                loop = asyncio.get_running_loop()

                async def until(condition: object, what: str) -> None:
                    await asyncio.to_thread(wait_for, condition, 60, what)  # type: ignore[arg-type]

                await until(lambda: all(c.ok >= 2 for c in clients) or any(t.done() for t in tasks), "traffic")
                old = group.primary()
                group.kill(old)
                await until(lambda: group.primary() != old, "a replica to be promoted")
                loop.call_soon_threadsafe(switched.set)
                # The server recovers by itself: every client gets answers again.
                await until(
                    lambda: all(c.ok_after_switch >= 2 for c in clients) or any(t.done() for t in tasks),
                    "every client to be answered after the switch",
                )
                stop.set()
                await asyncio.gather(*tasks)  # re-raises a client's failed assertion
                for c in clients:
                    assert await history(http, c.session_id) == c.seen, c
                return clients

        clients = asyncio.run(scenario())
    refusals = [r for c in clients for r in c.refusals]
    assert refusals, "the primary died while clients ran: some requests must have been refused"
    for status, code, retry_after in refusals:
        assert (status, code) in {(503, "store_unavailable"), (409, "session_busy")}
        assert retry_after is not None and int(retry_after) >= 1
    refused = {status: sum(r[0] == status for r in refusals) for status in (503, 409)}
    print(f"answered {sum(c.ok for c in clients)}, refused {refused}")

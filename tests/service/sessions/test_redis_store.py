"""The Redis session store against a real redis-server: leases and fencing, write-back, the cap
across replicas, TTL by key expiry, records refused for another model, a dead server, a missing or
wrong password, and TLS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.errors import (
    CorruptSession,
    ForeignSession,
    NotFound,
    ServiceConfigError,
    SessionBusy,
    StoreUnavailable,
    TooManySessions,
)
from service.sessions.record import decode, encode
from service.sessions.redis_store import POOL_CONNECTIONS, RedisSessionStore, check_credentials, redacted
from service.sessions.store import Session
from tests.redis_server import RedisServer
from tests.utils import free_port

MODELS = {"m": "a" * 64}


def store_for(url: str, **kw: Any) -> RedisSessionStore:
    options: dict[str, Any] = {"ttl_s": 30.0, "max_sessions": 100, "lease_ttl_s": 5.0, "models": MODELS}
    options.update(kw)
    return RedisSessionStore(url, prefix=f"t{time.monotonic_ns()}", **options)


def session(seed: int = 1) -> Session:
    s = Session.fresh("m", (2, 8), 2, seed)
    s.state[0] += 0.5
    s.logits = np.linspace(-1, 1, 11, dtype=np.float32)
    return s


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def test_record_round_trip_and_refusals() -> None:
    s = session()
    rng = s.rng()
    rng.random()
    s.rng_state = dict(rng.bit_generator.state)
    s.history_chars = 42
    back = decode(encode(s, MODELS["m"]), MODELS)
    assert back.id == s.id and back.seed == s.seed and back.history_chars == 42
    assert all(np.array_equal(a, b) for a, b in zip(back.state, s.state, strict=True))
    assert back.logits is not None and np.array_equal(back.logits, s.logits)
    assert back.rng().random() == rng.random()  # the RNG continues exactly
    data = encode(s, MODELS["m"])
    with pytest.raises(CorruptSession):
        decode(data[:-3], MODELS)
    with pytest.raises(CorruptSession):
        decode(b"XXXX" + data[4:], MODELS)
    with pytest.raises(CorruptSession, match="version"):
        decode(data[:4] + (99).to_bytes(2, "little") + data[6:], MODELS)
    with pytest.raises(ForeignSession, match="another version"):
        decode(data, {"m": "b" * 64})
    with pytest.raises(ForeignSession, match="does not serve"):
        decode(data, {"other": "a" * 64})
    assert ForeignSession.status == 409 and CorruptSession.status == 410


def test_lease_save_release_and_fencing(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = store_for(redis_server.url, lease_ttl_s=0.3)
        s = session()
        await store.create(s)
        loaded, lease = await store.lease(s.id)
        assert loaded.id == s.id and np.array_equal(loaded.state[0], s.state[0])
        with pytest.raises(SessionBusy) as busy:
            await store.lease(s.id)
        assert int(busy.value.headers["Retry-After"]) >= 1
        loaded.history_chars = 7
        assert await store.save(loaded, lease)
        assert (await store.get(s.id)).history_chars == 7
        # A holder that stops renewing loses the lease to the next request: its save is refused.
        _, old = await store.lease(s.id)
        store._held.clear()  # this process stops renewing (as a frozen replica would)
        await asyncio.sleep(0.5)
        _, new = await store.lease(s.id)
        assert new.token > old.token
        loaded.history_chars = 999
        assert not await store.save(loaded, old)
        assert (await store.get(s.id)).history_chars == 7
        await store.release(new)
        # An expired lease that nobody took since may still write back its request's state.
        _, late = await store.lease(s.id)
        store._held.clear()
        await asyncio.sleep(0.5)
        loaded.history_chars = 8
        assert await store.save(loaded, late)
        assert (await store.get(s.id)).history_chars == 8
        await store.close()

    run(scenario)


def test_renewal_keeps_a_long_request_leased(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = store_for(redis_server.url, lease_ttl_s=0.3, ttl_s=0.6)
        s = session()
        await store.create(s)
        held, lease = await store.lease(s.id)
        await asyncio.sleep(1.5)  # five lease TTLs, more than two session TTLs
        with pytest.raises(SessionBusy):
            await store.lease(s.id)
        assert await store.save(held, lease)
        await store.close()

    run(scenario)


def test_ttl_cap_across_replicas_and_delete(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        prefix = f"cap{time.monotonic_ns()}"
        one, two = (
            RedisSessionStore(redis_server.url, ttl_s=0.5, max_sessions=2, lease_ttl_s=5, models=MODELS, prefix=prefix)
            for _ in range(2)
        )
        await one.create(session())
        await two.create(session())
        with pytest.raises(TooManySessions) as full:
            await one.create(session())
        assert int(full.value.headers["Retry-After"]) >= 1
        assert (await two.stats()).sessions == 2
        await asyncio.sleep(0.7)  # both expire: Redis drops the records, the cap makes room
        s = session()
        await two.create(s)
        with pytest.raises(NotFound):
            await one.get("nope")
        _, lease = await one.lease(s.id)
        await one.delete(lease)
        with pytest.raises(NotFound):
            await two.get(s.id)
        await one.close()
        await two.close()

    run(scenario)


def test_corrupt_or_foreign_records_are_refused(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = store_for(redis_server.url)
        other = RedisSessionStore(
            redis_server.url, ttl_s=30, max_sessions=10, lease_ttl_s=5, models={"m": "b" * 64}, prefix=store.prefix
        )
        s = session()
        await store.create(s)
        with pytest.raises(ForeignSession):
            await other.get(s.id)
        with pytest.raises(ForeignSession):
            await other.lease(s.id)
        _, lease = await store.lease(s.id)  # the failed lease above was given back
        await store.release(lease)
        await store.client.set(store._keys(s.id, "")[0], b"garbage")
        with pytest.raises(CorruptSession):
            await store.get(s.id)
        await store.close()
        await other.close()

    run(scenario)


def test_an_unreachable_store_is_a_clear_503() -> None:
    async def scenario() -> None:
        store = store_for(f"redis://:hunter2@127.0.0.1:{free_port()}/0", timeout_s=0.5)
        for call in (store.check(), store.get("x"), store.create(session())):
            with pytest.raises(StoreUnavailable) as info:
                await call
            assert info.value.status == 503 and info.value.headers["Retry-After"] == "1"
            assert "127.0.0.1" in info.value.message and "hunter2" not in info.value.message
        await store.close()

    run(scenario)
    assert redacted("redis://u:secret@h:6379/0") == "redis://u:***@h:6379/0"


def test_a_missing_or_wrong_password_is_one_clear_line(redis_server: RedisServer) -> None:
    """At start-up a refused password stops the server with one line naming the variable; while it
    runs, every call (and /readyz) says the same. The password itself is never in either."""
    plain = f"redis://127.0.0.1:{redis_server.port}/0"
    wrong = f"redis://:not-{redis_server.password}@127.0.0.1:{redis_server.port}/0"
    for url, says in [(plain, "needs a password: put it in CHARSTREAM_SESSION_STORE"), (wrong, "refused the password")]:
        with pytest.raises(ServiceConfigError) as refused:
            check_credentials(url)
        message = str(refused.value)
        assert message.startswith(f"CHARSTREAM_SESSION_STORE: the session store {redacted(url)} {says}"), message
        assert "\n" not in message and redis_server.password not in message

        async def scenario(url: str = url, says: str = says) -> None:
            store = store_for(url)
            for call in (store.check(), store.create(session())):
                with pytest.raises(StoreUnavailable, match=says) as info:
                    await call
                assert info.value.status == 503 and redis_server.password not in info.value.message
            await store.close()

        run(scenario)
    check_credentials(redis_server.url)  # the right one passes
    check_credentials(f"redis://:x@127.0.0.1:{free_port()}/0", timeout_s=0.5)  # nobody there: /readyz's business


def test_tls_with_a_password(tmp_path: Path) -> None:
    """rediss:// reaches redis-py as it is: TLS with the URL's CA file, and the password."""
    server = RedisServer(tmp_path / "tls", tls=True).start()
    try:
        assert server.url.startswith("rediss://")
        check_credentials(server.url)

        async def scenario() -> None:
            store = store_for(server.url)
            s = session()
            await store.create(s)
            loaded, lease = await store.lease(s.id)
            assert await store.save(loaded, lease)
            assert (await store.get(s.id)).id == s.id
            await store.close()

        run(scenario)
        with pytest.raises(ServiceConfigError, match="needs a password"):
            check_credentials(redacted(server.url).replace(":***@", ""))
    finally:
        server.stop()


def test_a_burst_of_requests_waits_for_a_connection_instead_of_failing(redis_server: RedisServer) -> None:
    """Many more concurrent operations than the pool's connections (redis-py's default pool refuses
    past 100 with 'Too many connections'): every one succeeds, over at most POOL_CONNECTIONS sockets."""
    burst = 4 * POOL_CONNECTIONS

    async def scenario() -> None:
        store = store_for(redis_server.url, max_sessions=10 * burst)
        sessions = [session(seed) for seed in range(burst)]
        await asyncio.gather(*(store.create(s) for s in sessions))
        leased = await asyncio.gather(*(store.lease(s.id) for s in sessions))
        assert all(await asyncio.gather(*(store.save(s, lease) for s, lease in leased)))
        clients = int((await store.client.info("clients"))["connected_clients"])
        assert clients <= POOL_CONNECTIONS + 1  # this test's own connections, and the one asking
        await store.close()

    run(scenario)


def test_a_session_is_only_its_owners_across_replicas(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        one = store_for(redis_server.url)
        other = RedisSessionStore(
            redis_server.url, ttl_s=30, max_sessions=100, lease_ttl_s=5, models=MODELS, prefix=one.prefix
        )
        s = session()
        s.owner = "alice"
        await one.create(s)
        for owner in ("bob", ""):
            with pytest.raises(NotFound):
                await other.get(s.id, owner)
            with pytest.raises(NotFound):
                await other.lease(s.id, owner)
        loaded, lease = await other.lease(s.id, "alice")  # no other owner's attempt holds the lease
        assert loaded.owner == "alice" and lease.owner == "alice"
        loaded.history_chars = 5
        assert await other.save(loaded, lease)
        assert (await one.get(s.id, "alice")).history_chars == 5
        # A key's sessions live under its tag: the id alone names nothing.
        assert not await one.client.exists(one._keys(s.id, "")[0])
        assert await one.client.exists(one._keys(s.id, "alice")[0])
        await one.close()
        await other.close()

    run(scenario)


def test_an_owners_cap_holds_across_replicas(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        one = store_for(redis_server.url)
        other = RedisSessionStore(
            redis_server.url, ttl_s=30, max_sessions=100, lease_ttl_s=5, models=MODELS, prefix=one.prefix
        )
        made = []
        for store in (one, other):
            s = session()
            s.owner = "alice"
            await store.create(s, max_owned=2)
            made.append(s)
        extra = session()
        extra.owner = "alice"
        with pytest.raises(TooManySessions, match="'alice' holds its maximum of 2") as refused:
            await other.create(extra, max_owned=2)
        assert int(refused.value.headers["Retry-After"]) >= 1
        theirs = session()
        theirs.owner = "bob"
        await one.create(theirs, max_owned=2)
        _, lease = await one.lease(made[0].id, "alice")
        await one.delete(lease)  # frees the owner's slot as well as the server's
        await other.create(extra, max_owned=2)
        assert (await one.stats()).sessions == 3
        await one.close()
        await other.close()

    run(scenario)

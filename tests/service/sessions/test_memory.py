from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.errors import NotFound, SessionBusy, TooManySessions
from service.sessions.memory import InMemorySessionStore
from service.sessions.store import Session


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _session(seed: int = 1) -> Session:
    return Session.fresh("m", (2, 8), 2, seed)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_ttl_evicts_idle_sessions_but_not_leased_ones() -> None:
    clock = Clock()
    store = InMemorySessionStore(ttl_s=10, max_sessions=10, clock=clock)

    async def scenario() -> None:
        idle, busy = _session(), _session()
        await store.create(idle)
        await store.create(busy)
        _, lease = await store.lease(busy.id)
        clock.now += 11
        with pytest.raises(NotFound):
            await store.get(idle.id)  # expired even before the sweep
        assert await store.evict_expired() == 1
        assert (await store.get(busy.id)).id == busy.id
        assert await store.save(busy, lease)
        clock.now += 5
        assert await store.evict_expired() == 0  # a save counts as use
        clock.now += 6
        assert await store.evict_expired() == 1

    run(scenario())


def test_cap_answers_too_many_with_retry_after() -> None:
    clock = Clock()
    store = InMemorySessionStore(ttl_s=30, max_sessions=2, clock=clock)

    async def scenario() -> None:
        await store.create(_session())
        clock.now += 10
        await store.create(_session())
        with pytest.raises(TooManySessions) as info:
            await store.create(_session())
        assert info.value.status == 429 and info.value.headers["Retry-After"] == "21"
        clock.now += 21  # the first one expires: room again
        await store.create(_session())
        assert (await store.stats()).sessions == 2

    run(scenario())


def test_lease_is_exclusive_and_fenced() -> None:
    store = InMemorySessionStore(ttl_s=30, max_sessions=5)

    async def scenario() -> None:
        s = _session()
        await store.create(s)
        _, first = await store.lease(s.id)
        with pytest.raises(SessionBusy, match="busy"):
            await store.lease(s.id)
        await store.release(first)
        _, second = await store.lease(s.id)
        assert second.token > first.token
        assert not await store.save(s, first)  # an old lease can never write
        assert await store.save(s, second)
        await store.lease(s.id)

    run(scenario())


def test_fork_is_independent_and_reset_restores_the_seed() -> None:
    s = _session(seed=42)
    s.state[0] += 1.0
    s.logits = np.ones(5, np.float32)
    first_draw = np.random.default_rng(42).random()
    child = s.fork()
    child.state[0] += 5.0
    assert float(s.state[0].max()) == 1.0 and float(child.state[0].max()) == 6.0
    assert child.rng().random() == s.rng().random() == first_draw  # the same RNG stream, separately
    other = s.fork(seed=7)
    assert other.seed == 7 and other.rng().random() == np.random.default_rng(7).random()
    rng = s.rng()
    rng.random()
    s.rng_state = rng.bit_generator.state
    assert s.rng().random() == np.random.default_rng(42).random(2)[1]  # continues where it stopped
    s.reset()
    assert s.logits is None and s.history_chars == 0 and float(np.abs(s.state[0]).max()) == 0.0
    assert s.rng().random() == first_draw


def test_memory_accounting() -> None:
    store = InMemorySessionStore(ttl_s=30, max_sessions=5)
    s = Session.fresh("m", (2, 512), 2, 1)
    s.logits = np.zeros(65, np.float32)
    run(store.create(s))
    stats = run(store.stats())
    assert stats.state_bytes == 2 * 2 * 512 * 4 + 65 * 4
    assert stats.state_bytes < stats.approx_bytes < 64 * 1024


def test_a_session_is_only_its_owners() -> None:
    async def scenario() -> None:
        store = InMemorySessionStore(ttl_s=60, max_sessions=10)
        s = _session()
        s.owner = "alice"
        await store.create(s)
        for other in ("bob", ""):
            with pytest.raises(NotFound):
                await store.get(s.id, other)
            with pytest.raises(NotFound):
                await store.lease(s.id, other)
        _, lease = await store.lease(s.id, "alice")  # nobody else's attempt held it
        assert lease.owner == "alice"
        await store.delete(lease)

    run(scenario())


def test_an_owner_holds_at_most_max_owned_sessions() -> None:
    async def scenario() -> None:
        clock = Clock()
        store = InMemorySessionStore(ttl_s=60, max_sessions=10, clock=clock)
        mine = []
        for _ in range(2):
            s = _session()
            s.owner = "alice"
            await store.create(s, max_owned=2)
            mine.append(s)
        extra = _session()
        extra.owner = "alice"
        with pytest.raises(TooManySessions, match="'alice' holds its maximum of 2"):
            await store.create(extra, max_owned=2)
        theirs = _session()
        theirs.owner = "bob"
        await store.create(theirs, max_owned=2)  # bob's count is his own
        _, lease = await store.lease(mine[0].id, "alice")
        await store.delete(lease)
        await store.create(extra, max_owned=2)
        late = _session()
        late.owner = "alice"
        clock.now += 61  # idle sessions expire, and no longer count
        await store.create(late, max_owned=2)

    run(scenario())

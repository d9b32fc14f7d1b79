"""Sessions in a Redis server, shared by every worker and replica.

Keys, all with the session's name as a hash tag so that one session's keys share a cluster slot:

    {prefix}:{<name>}:rec   the session record (record.py), expiring after the TTL
    {prefix}:{<name>}:lease the fencing token of the request holding the session, expiring after
                            the lease TTL unless renewed (every lease TTL / 3 while it runs)
    {prefix}:{<name>}:fence the last token handed out for the session
    {prefix}:index          a sorted set of session names by expiry time: the cap across replicas
    {prefix}:index:<owner>  the same, of one key's sessions: that key's cap

A session's name is its id, after its owner's tag when a key made it (16 hex digits of the
sha256 of the key's name, and a slash): another key asking for the same id names other keys, so
it finds nothing, and can neither read the session nor hold its lease. A server without keys
names sessions by their ids alone, as before keys owned sessions. A create counts the session in
both indexes in one script, so the store is one server or a Sentinel group, not a Redis Cluster.

Every step that must not interleave with another replica's runs as one Lua script: taking a
lease reads the record in the same round trip, and a save only lands while the saver's token is
the current one (or nobody has leased the session since), so a replica that lost its lease can
never overwrite newer state.

A token is the primary's clock in microseconds (or the last token plus one, whichever is
larger), not a counter: after a failover to a replica that missed the last writes, a counter
would start again below tokens the old primary already gave, and a holder fenced out there
could write again. The clock of the promoted server is past every token the old one gave as long
as the servers' clocks differ by less than a failover takes (seconds). With `wait_replicas`,
every lease, create and save is confirmed by Redis's WAIT on that many replicas before it
counts, so a promoted replica has it (Sentinel promotes the replica that is furthest along).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, RedisError

from service.errors import NotFound, ServiceConfigError, StoreUnavailable
from service.sessions.record import decode, encode
from service.sessions.store import (
    Lease,
    Session,
    SessionStore,
    StoreStats,
    session_busy,
    session_not_found,
    too_many_owned,
    too_many_sessions,
)
from service.settings import SENTINEL_SCHEME, parse_sentinel_url

log = logging.getLogger("charstream.redis")
T = TypeVar("T")

# How long a write waits for its replicas (CHARSTREAM_REDIS_WAIT_REPLICAS) before it fails as
# 503: well inside the socket timeout, long enough for a replica on a busy host.
WAIT_TIMEOUT_MS = 1000

LEASE = """
local rec = redis.call('GET', KEYS[1])
if not rec then return {0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1, redis.call('PTTL', KEYS[2])} end
local now = redis.call('TIME')
local token = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[3]))
if last and last >= token then token = last + 1 end
token = string.format('%.0f', token)
redis.call('SET', KEYS[3], token, 'PX', tonumber(ARGV[2]) * 2)
redis.call('SET', KEYS[2], token, 'PX', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {token, rec}
"""
SAVE = """
local cur = redis.call('GET', KEYS[2])
if cur == ARGV[1] or (not cur and redis.call('GET', KEYS[3]) == ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  if ARGV[4] == '1' and cur then redis.call('DEL', KEYS[2]) end
  return 1
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
RENEW = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""
DELETE = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return 1
end
return 0
"""
PUT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
READ = """
return redis.call('GETEX', KEYS[1], 'PX', ARGV[1])
"""
ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, first[2]}
end
if KEYS[2] then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {-1, first[2]}
  end
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
return {1}
"""


def redacted(url: str) -> str:
    """The store's URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def describe(url: str) -> str:
    """Any store URL without its password."""
    return parse_sentinel_url(url).describe() if url.startswith(SENTINEL_SCHEME) else redacted(url)


def has_password(url: str) -> bool:
    if url.startswith(SENTINEL_SCHEME):
        return parse_sentinel_url(url).password is not None
    return urlsplit(url).password is not None


def refused_credentials(exc: BaseException) -> bool:
    """Whether an error is the store refusing charstream's credentials (a missing or wrong password):
    the server's own refusal, or every sentinel's (redis-py then reports no primary found)."""
    return isinstance(exc, AuthenticationError) or (
        isinstance(exc, MasterNotFoundError) and "AuthenticationError" in str(exc)
    )


def credentials_refused(described: str, password_given: bool, exc: BaseException) -> str:
    """One line saying which store refused the credentials and what to set."""
    if not password_given:
        return (
            f"the session store {described} needs a password: put it in CHARSTREAM_SESSION_STORE "
            "before the host, as :PASSWORD@"
        )
    reply = f" ({exc})" if isinstance(exc, AuthenticationError) else ""
    return f"the session store {described} refused the password in CHARSTREAM_SESSION_STORE{reply}"


def check_credentials(url: str, timeout_s: float = 2.0) -> None:
    """For the start-up: ServiceConfigError (one line) when the store answers but refuses
    charstream's credentials. A store that cannot be reached passes: it may come up later, and
    /readyz says not ready until it does."""

    async def ping() -> None:
        client, sentinels = connect(url, timeout_s)
        try:
            await client.ping()
        finally:
            await client.aclose()
            for sentinel in sentinels:
                await sentinel.aclose()

    try:
        asyncio.run(ping())
    except (RedisError, OSError) as exc:
        if refused_credentials(exc):
            refusal = credentials_refused(describe(url), has_password(url), exc)
            raise ServiceConfigError(f"CHARSTREAM_SESSION_STORE: {refusal}") from None


# Connections to Redis per process. A command takes a few hundred microseconds, so a few dozen serve
# thousands of requests a second; past them a command waits for a free connection (up to
# POOL_WAIT_S) instead of failing, as redis-py's default pool of 100 does, and instead of a burst
# of streams opening hundreds of sockets to Redis at once.
POOL_CONNECTIONS = 64
POOL_WAIT_S = 10.0


class SentinelBlockingConnectionPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's pool (connections to whichever server is the primary now) that waits for a free
    connection when all are busy, as `BlockingConnectionPool` does for one server."""


def connect(url: str, timeout_s: float) -> tuple[aioredis.Redis, list[aioredis.Redis]]:
    """A client of the server `url` names, and the sentinels' clients when it names sentinels.

    Through sentinels, every new connection asks them for the primary: after a failover the
    next connection (the retry of a dropped one included) reaches the promoted server."""
    # A dead server answers within ~timeout x 2: one retry covers a dropped connection.
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        "health_check_interval": 15,
        "max_connections": POOL_CONNECTIONS,
        "timeout": POOL_WAIT_S,  # the pool's wait for a free connection
    }
    if not url.startswith(SENTINEL_SCHEME):
        pool = aioredis.BlockingConnectionPool.from_url(url, **options)
        return aioredis.Redis.from_pool(pool), []  # the client owns the pool: closing it closes the pool
    from redis.asyncio.sentinel import Sentinel

    address = parse_sentinel_url(url)
    # The URL's credentials are the sentinels' as well as the data servers' (requirepass on both).
    sentinel_kwargs = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "username": address.username,
        "password": address.password,
    }
    sentinel = Sentinel(list(address.sentinels), sentinel_kwargs=sentinel_kwargs)
    client = sentinel.master_for(
        address.service,
        connection_pool_class=SentinelBlockingConnectionPool,
        db=address.db,
        username=address.username,
        password=address.password,
        **options,
    )
    return client, list(sentinel.sentinels)


def owner_tag(owner: str) -> str:
    """A key's name as it appears in Redis keys: fixed-length hex, whatever characters the name has."""
    return hashlib.sha256(owner.encode()).hexdigest()[:16]


def stored_name(session_id: str, owner: str) -> str:
    """The session's name in Redis: its id, after its owner's tag when a key made it."""
    return f"{owner_tag(owner)}/{session_id}" if owner else session_id


class RedisSessionStore(SessionStore):
    def __init__(
        self,
        url: str,
        ttl_s: float,
        max_sessions: int,
        lease_ttl_s: float,
        models: dict[str, str],
        prefix: str = "charstream",
        timeout_s: float = 2.0,
        wait_replicas: int = 0,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.lease_ttl_s = lease_ttl_s
        self.models = models  # model id -> sha256 of the file this process serves
        self.prefix = prefix
        self.wait_replicas = wait_replicas
        self.url = describe(url)
        self._password_given = has_password(url)
        self.client, self._sentinels = connect(url, timeout_s)
        self._lease = self.client.register_script(LEASE)
        self._save = self.client.register_script(SAVE)
        self._release = self.client.register_script(RELEASE)
        self._renew = self.client.register_script(RENEW)
        self._delete = self.client.register_script(DELETE)
        self._admit = self.client.register_script(ADMIT)
        self._put = self.client.register_script(PUT)
        self._read = self.client.register_script(READ)
        self._held: dict[str, Lease] = {}  # leases this process holds, renewed in the background
        self._renewer: asyncio.Task[None] | None = None
        self._record_bytes = 0  # size of the last record written, for the metrics' estimate

    def describe(self) -> str:
        return self.url

    def _keys(self, session_id: str, owner: str) -> list[str]:
        tag = f"{self.prefix}:{{{stored_name(session_id, owner)}}}"
        return [f"{tag}:rec", f"{tag}:lease", f"{tag}:fence"]

    @property
    def _index(self) -> str:
        return f"{self.prefix}:index"

    def _owner_index(self, owner: str) -> str:
        return f"{self.prefix}:index:{owner_tag(owner)}"

    def _ms(self, seconds: float) -> int:
        return max(1, int(seconds * 1000))

    async def _call(self, what: Awaitable[T]) -> T:
        try:
            return await what
        except RedisError as exc:
            if refused_credentials(exc):
                raise StoreUnavailable(credentials_refused(self.url, self._password_given, exc)) from None
            raise StoreUnavailable(f"the session store {self.url} is unavailable: {exc}") from None
        except OSError as exc:
            raise StoreUnavailable(f"the session store {self.url} is unreachable: {exc}") from None

    async def _confirmed(
        self, script: Any, keys: list[str], args: list[Any], undo: Callable[[Any], Awaitable[None]] | None = None
    ) -> Any:
        """Run a script; with `wait_replicas`, return only once that many replicas have what it wrote
        and read (else StoreUnavailable, after `undo` of the script's result).

        WAIT counts the replicas that acknowledged the replication stream up to its connection's
        last write, so it goes in one pipeline with the script (one connection, one round trip).
        A read that touches the key (GETEX) is such a write: a state read under WAIT is one that
        a failover keeps, never a save that the replicas have not seen yet."""
        if not self.wait_replicas:
            return await self._call(script(keys=keys, args=args))

        async def confirmed() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                await script(keys=keys, args=args, client=pipe)
                pipe.wait(self.wait_replicas, WAIT_TIMEOUT_MS)
                return list(await pipe.execute())

        result, replicas = await self._call(confirmed())
        if int(replicas) < self.wait_replicas:
            if undo is not None:
                await undo(result)
            raise StoreUnavailable(
                f"the session store {self.url} confirmed the write on {int(replicas)} of "
                f"{self.wait_replicas} replicas within {WAIT_TIMEOUT_MS} ms"
            )
        return result

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        """Keep this process's leases (and their records) alive while their requests run."""
        while True:
            await asyncio.sleep(self.lease_ttl_s / 3)
            held = list(self._held.values())
            if not held:
                continue
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for lease in held:
                        await self._renew(
                            keys=self._keys(lease.session_id, lease.owner),
                            args=[lease.token, self._ms(self.lease_ttl_s), self._ms(self.ttl_s)],
                            client=pipe,
                        )
                    results = await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("lease renewal failed", extra={"store": self.url, "error": str(exc)})
                continue
            for lease, kept in zip(held, results, strict=True):
                if not kept and self._held.get(lease.session_id) == lease:
                    log.warning("lease lost")

    # -- the interface -----------------------------------------------------------------------------

    async def create(self, session: Session, max_owned: int | None = None) -> None:
        now = time.time()
        expiry = now + self.ttl_s
        owner, name = session.owner, stored_name(session.id, session.owner)
        # A key's sessions are counted on their own too (without a cap of its own: the server's).
        owned_cap = max_owned if max_owned is not None else self.max_sessions
        keys = [self._index, self._owner_index(owner)] if owner else [self._index]
        args: list[str | int] = [self._ms(now), self.max_sessions, name, self._ms(expiry), owned_cap]
        admitted = await self._call(self._admit(keys=keys, args=args))
        if int(admitted[0]) != 1:
            retry = max(1, int(float(admitted[1]) / 1000 - now) + 1)
            if int(admitted[0]) == -1:
                raise too_many_owned(owner, owned_cap, retry)
            raise too_many_sessions(self.max_sessions, retry, "the servers hold their maximum of")
        session.expires_at = expiry
        record = self._encode(session)
        await self._confirmed(self._put, [self._keys(session.id, owner)[0]], [record, self._ms(self.ttl_s)])

    def _encode(self, session: Session) -> bytes:
        # A session keeps the version it was made with, also when the model is swapped while it runs.
        session.model_sha256 = session.model_sha256 or self.version_of(session)
        record = encode(session, session.model_sha256)
        self._record_bytes = len(record)
        return record

    def _not_found(self, session_id: str) -> NotFound:
        return session_not_found(session_id)

    async def _touch_index(self, session_id: str, owner: str) -> float:
        expiry = time.time() + self.ttl_s
        entry = {stored_name(session_id, owner): self._ms(expiry)}
        with contextlib.suppress(RedisError, OSError):  # the caps' bookkeeping: best effort
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zadd(self._index, entry, xx=True)
                if owner:
                    pipe.zadd(self._owner_index(owner), entry, xx=True)
                await pipe.execute()
        return expiry

    async def get(self, session_id: str, owner: str = "") -> Session:
        data = await self._confirmed(self._read, [self._keys(session_id, owner)[0]], [self._ms(self.ttl_s)])
        if data is None:
            raise self._not_found(session_id)
        session = decode(data if isinstance(data, bytes) else data.encode(), self.models)
        session.expires_at = await self._touch_index(session_id, owner)
        return session

    async def lease(self, session_id: str, owner: str = "") -> tuple[Session, Lease]:
        keys = self._keys(session_id, owner)

        async def unconfirmed(result: Any) -> None:  # a lease the replicas may not know: give it back
            if int(result[0]) > 0:
                with contextlib.suppress(RedisError, OSError):
                    await self._release(keys=keys, args=[int(result[0]), self._ms(self.ttl_s)])

        result = await self._confirmed(
            self._lease, keys, [self._ms(self.lease_ttl_s), self._ms(self.ttl_s)], undo=unconfirmed
        )
        if result[0] == 0:
            raise self._not_found(session_id)
        if result[0] == -1:
            retry = max(1, int(result[1]) // 1000 + 1)
            raise session_busy(session_id, retry)
        lease = Lease(session_id, int(result[0]), owner)
        try:
            session = decode(result[1], self.models)
        except BaseException:
            await self.release(lease)
            raise
        session.expires_at = await self._touch_index(session_id, owner)
        self._held[session_id] = lease
        self._start_renewing()
        return session, lease

    async def save(self, session: Session, lease: Lease, release: bool = True) -> bool:
        if release:
            self._held.pop(lease.session_id, None)
        saved = await self._confirmed(
            self._save,
            self._keys(lease.session_id, lease.owner),
            [lease.token, self._encode(session), self._ms(self.ttl_s), "1" if release else "0"],
        )
        if not saved:
            log.warning("save refused: the lease was lost")
            return False
        session.expires_at = await self._touch_index(lease.session_id, lease.owner)
        return True

    async def release(self, lease: Lease) -> None:
        self._held.pop(lease.session_id, None)
        keys = self._keys(lease.session_id, lease.owner)
        await self._call(self._release(keys=keys, args=[lease.token, self._ms(self.ttl_s)]))

    async def delete(self, lease: Lease) -> None:
        self._held.pop(lease.session_id, None)
        await self._call(self._delete(keys=self._keys(lease.session_id, lease.owner), args=[lease.token]))
        name = stored_name(lease.session_id, lease.owner)
        with contextlib.suppress(RedisError, OSError):
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zrem(self._index, name)
                if lease.owner:
                    pipe.zrem(self._owner_index(lease.owner), name)
                await pipe.execute()

    async def evict_expired(self) -> int:
        """Redis expires records by itself; this only trims the cap's index."""
        removed: Any = await self._call(self.client.zremrangebyscore(self._index, "-inf", self._ms(time.time())))
        return int(removed)

    async def stats(self) -> StoreStats:
        sessions = int(await self._call(self.client.zcard(self._index)))
        estimate = sessions * self._record_bytes
        return StoreStats(sessions=sessions, busy=len(self._held), state_bytes=estimate, approx_bytes=estimate)

    async def check(self) -> None:
        await self._call(self.client.ping())

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self.client.aclose()
        for sentinel in self._sentinels:
            await sentinel.aclose()

"""Per-key limits: requests a second and characters a second, counted where every replica sees them.

Each key's own quota (the keys file) applies, else the server's defaults (CHARSTREAM_REQUESTS_PER_S,
CHARSTREAM_CHARS_PER_S). Without keys the same defaults apply per client address. The counts
live in the session store's Redis when there is one, so N replicas enforce one limit rather
than N, and in this process otherwise; `limits` keeps them as sliding-window counters, the
shared equivalent of a token bucket refilled at the rate.

A request is charged up front: one request, and the characters it may read and write (the
prompt and its max_new_chars, every text scored), so a limit holds before the work is done. A
charge over a whole window's allowance could never pass, and is refused with 413 instead of a
429 the client would retry forever.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisSentinelStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from starlette.requests import HTTPConnection

from service.api.keys import ApiKey, Keyring, Quota
from service.errors import RateLimited, TooLarge
from service.metrics import Metrics
from service.sessions.store import ANYONE, Owner
from service.settings import SENTINEL_SCHEME, Settings

log = logging.getLogger("charstream.quotas")

Limit = Literal["requests_per_s", "chars_per_s"]
# Characters are allowed in bursts of this many seconds' worth: one long generation must fit.
CHARS_WINDOW_S = 10
KEY_SUFFIX = "-limits"  # after CHARSTREAM_REDIS_PREFIX


@dataclass(frozen=True)
class Caller:
    """Whom a limit counts: a key by its name, or a client address where the server has no keys."""

    ident: str
    label: str  # for metrics: the key's name, or "client" (addresses would be unbounded labels)
    quota: Quota


def storage_for(session_store: str, redis_prefix: str = "charstream") -> Storage:
    """Where the counts live: this process's memory, or the session store's Redis under `{prefix}-limits`."""
    if session_store == "memory":
        return MemoryStorage()
    key_prefix = f"{redis_prefix}{KEY_SUFFIX}"
    if session_store.startswith(SENTINEL_SCHEME):
        return RedisSentinelStorage(f"async+{session_store}", implementation="redispy", key_prefix=key_prefix)
    scheme = "redis+unix://" if session_store.startswith("unix://") else ""
    uri = f"async+{scheme}{session_store.removeprefix('unix://')}" if scheme else f"async+{session_store}"
    return RedisStorage(uri, implementation="redispy", key_prefix=key_prefix)


def window(limit: Limit, rate: float) -> RateLimitItem:
    """The sliding window a rate is counted in: at least a second, long enough for one hit."""
    seconds = CHARS_WINDOW_S if limit == "chars_per_s" else max(1, math.ceil(1 / rate))
    return RateLimitItemPerSecond(max(1, round(rate * seconds)), seconds)


class RateLimits:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.defaults = Quota(settings.requests_per_s, settings.chars_per_s, settings.max_sessions_per_key)
        self.metrics = metrics
        self.storage = storage_for(settings.session_store, settings.redis_prefix)
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)

    def caller(self, key: ApiKey | None, client: str | None) -> Caller:
        if key is None:
            return Caller(f"client:{client or '-'}", "client", self.defaults)
        own = key.quota
        quota = Quota(
            own.requests_per_s if own.requests_per_s is not None else self.defaults.requests_per_s,
            own.chars_per_s if own.chars_per_s is not None else self.defaults.chars_per_s,
            own.max_sessions if own.max_sessions is not None else self.defaults.max_sessions,
        )
        return Caller(f"key:{key.name}", key.name, quota)

    def publish(self, keyring: Keyring) -> None:
        """Each key's limits as gauges, so a dashboard shows use beside allowance."""
        for key in keyring.keys:
            quota = self.caller(key, None).quota
            for name, value in (
                ("requests_per_s", quota.requests_per_s),
                ("chars_per_s", quota.chars_per_s),
                ("max_sessions", quota.max_sessions),
            ):
                if value is not None:
                    self.metrics.rate_limit.labels(key.name, name).set(value)

    async def charge(self, caller: Caller, limit: Limit, cost: int = 1) -> None:
        """Count `cost` against the caller's limit; RateLimited (429, Retry-After) when it is spent."""
        rate = caller.quota.requests_per_s if limit == "requests_per_s" else caller.quota.chars_per_s
        if rate is None or cost <= 0:
            return
        item = window(limit, rate)
        if cost > item.amount:
            raise TooLarge(
                f"this request needs {cost} characters, more than the {item.amount} that {caller.label!r} may use "
                f"in {item.multiples} s (chars_per_s {rate:g}): ask for fewer"
            )
        try:
            if await self.limiter.hit(item, caller.ident, limit, cost=cost):
                return
            stats = await self.limiter.get_window_stats(item, caller.ident, limit)
        except Exception as exc:  # the store is down: sessions say so; limits must not take the server down too
            self.metrics.rate_limit_errors.inc()
            log.warning("a rate limit could not be checked", extra={"error": type(exc).__name__})
            return
        self.metrics.rate_limited.labels(caller.label, limit).inc()
        retry = max(1, math.ceil(stats.reset_time - time.time()))
        raise RateLimited(
            f"{caller.label!r} is over its {limit.replace('_per_s', '')} limit ({rate:g} a second); retry in {retry} s",
            headers={"Retry-After": str(retry)},
        )

    async def close(self) -> None:
        """Close the Redis connections. `limits` has no close of its own: its redis-py client (and
        a Sentinel's clients) are closed here."""
        client = getattr(getattr(self.storage, "bridge", None), "storage", None)
        for each in [client, *getattr(client, "sentinels", [])]:
            if each is not None and hasattr(each, "aclose"):
                await each.aclose()


def owner_of(conn: HTTPConnection) -> Owner:
    """Whose sessions the request may touch: its key's, with the key's session cap; on a server
    without keys, anyone's (the sessions cap is then the server's, max_sessions)."""
    key: ApiKey | None = conn.scope.get("state", {}).get("api_key")
    if key is None:
        return ANYONE
    return Owner(key.name, caller_of(conn).quota.max_sessions)


def caller_of(conn: HTTPConnection) -> Caller:
    """The caller of a request the gate has let in (its key rides on the request's state)."""
    limits: RateLimits = conn.app.state.rate_limits
    client = conn.scope.get("client")
    return limits.caller(conn.scope.get("state", {}).get("api_key"), client[0] if client else None)


async def charge_chars(conn: HTTPConnection, chars: int) -> None:
    """Charge a request's characters (read and written) to its caller before its work starts."""
    limits: RateLimits = conn.app.state.rate_limits
    await limits.charge(caller_of(conn), "chars_per_s", chars)

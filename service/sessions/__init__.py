"""Sessions between requests: the store interface, its two homes, and the record format.

`store` holds the data (`Session`, `Lease`) and the interface, `memory` the embedded store of one
process, `redis_store` the store every worker and replica shares (one server, or the primary that
Redis Sentinel names), and `record` the versioned bytes a session
becomes in Redis. `open_store` picks the home a URL names. Nothing here knows the
scheduler or HTTP.
"""

from __future__ import annotations

from service.sessions.memory import InMemorySessionStore
from service.sessions.store import SessionStore


def open_store(
    url: str,
    *,
    ttl_s: float,
    max_sessions: int,
    lease_ttl_s: float,
    models: dict[str, str],
    wait_replicas: int = 0,
    prefix: str = "charstream",
) -> SessionStore:
    """The store `url` names: "memory", or a Redis URL (`models` maps each model id to its file's sha256;
    a Redis store confirms each write on `wait_replicas` replicas)."""
    if url == "memory":
        return InMemorySessionStore(ttl_s, max_sessions, models=models)
    from service.sessions.redis_store import RedisSessionStore  # only a Redis deployment needs redis-py

    return RedisSessionStore(
        url,
        ttl_s=ttl_s,
        max_sessions=max_sessions,
        lease_ttl_s=lease_ttl_s,
        models=models,
        wait_replicas=wait_replicas,
        prefix=prefix,
    )

"""The embedded session store: this process's memory (sessions end with the process, one worker's own)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import service.sessions.store as store
from service.sessions.store import Lease, Session, SessionStore, StoreStats


class InMemorySessionStore(SessionStore):
    def __init__(
        self,
        ttl_s: float,
        max_sessions: int,
        clock: Callable[[], float] = time.monotonic,
        models: dict[str, str] | None = None,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.models = {} if models is None else models
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._last_used: dict[str, float] = {}
        self._leases: dict[str, int] = {}  # session id -> token of the request holding it
        self._owned: Counter[str] = Counter()  # owner -> sessions held (expired ones until swept)
        self._tokens = 0

    def describe(self) -> str:
        return "memory"

    def _expires_in(self, session_id: str) -> float:
        return self._last_used[session_id] + self.ttl_s - self._clock()

    def _use(self, session: Session) -> None:
        self._last_used[session.id] = self._clock()
        session.expires_at = time.time() + self.ttl_s

    def _found(self, session_id: str, owner: str) -> Session:
        session = self._sessions.get(session_id)
        if (
            session is None
            or session.owner != owner
            or (self._expires_in(session_id) <= 0 and session_id not in self._leases)
        ):
            raise store.session_not_found(session_id)
        return session

    def _soonest_expiry(self, owner: str | None = None) -> int:
        """Seconds until the first of the sessions (of `owner`, if given) expires, as a Retry-After."""
        idle = (self._expires_in(sid) for sid, s in self._sessions.items() if owner is None or s.owner == owner)
        return max(1, int(min(idle, default=self.ttl_s)) + 1)

    async def create(self, session: Session, max_owned: int | None = None) -> None:
        full = len(self._sessions) >= self.max_sessions
        if full or (max_owned is not None and self._owned[session.owner] >= max_owned):
            await self.evict_expired()
        if len(self._sessions) >= self.max_sessions:
            raise store.too_many_sessions(self.max_sessions, self._soonest_expiry(), "the server holds its maximum of")
        if max_owned is not None and self._owned[session.owner] >= max_owned:
            raise store.too_many_owned(session.owner, max_owned, self._soonest_expiry(session.owner))
        session.model_sha256 = session.model_sha256 or self.version_of(session)
        self._sessions[session.id] = session
        self._owned[session.owner] += 1
        self._use(session)

    def _drop(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        self._last_used.pop(session_id, None)
        if session is not None:
            self._owned[session.owner] -= 1
            if not self._owned[session.owner]:
                del self._owned[session.owner]

    async def get(self, session_id: str, owner: str = "") -> Session:
        session = self.check_version(self._found(session_id, owner))
        self._use(session)
        return session

    async def lease(self, session_id: str, owner: str = "") -> tuple[Session, Lease]:
        session = self.check_version(self._found(session_id, owner))
        if session_id in self._leases:
            raise store.session_busy(session_id, 1)
        self._tokens += 1
        self._leases[session_id] = self._tokens
        self._use(session)
        return session, Lease(session_id, self._tokens, owner)

    def _holds(self, lease: Lease) -> bool:
        return self._leases.get(lease.session_id) == lease.token

    async def save(self, session: Session, lease: Lease, release: bool = True) -> bool:
        if not self._holds(lease) or lease.session_id not in self._sessions:
            return False
        self._sessions[lease.session_id] = session
        self._use(session)
        if release:
            del self._leases[lease.session_id]
        return True

    async def release(self, lease: Lease) -> None:
        if self._holds(lease):
            del self._leases[lease.session_id]
            if lease.session_id in self._sessions:
                self._last_used[lease.session_id] = self._clock()

    async def delete(self, lease: Lease) -> None:
        if self._holds(lease):
            del self._leases[lease.session_id]
            self._drop(lease.session_id)

    async def evict_expired(self) -> int:
        expired = [sid for sid in self._sessions if sid not in self._leases and self._expires_in(sid) <= 0]
        for sid in expired:
            self._drop(sid)
        return len(expired)

    async def stats(self) -> StoreStats:
        sessions = self._sessions.values()
        return StoreStats(
            sessions=len(self._sessions),
            busy=len(self._leases),
            state_bytes=sum(s.state_bytes for s in sessions),
            approx_bytes=sum(s.approx_bytes() for s in sessions),
        )

"""Server-side sessions: each keeps its model's recurrent state, next-char logits and its own RNG.

The store is an interface so that state can live elsewhere (a Redis store keeps the same
methods); `InMemorySessionStore` is the embedded default. A session is leased to one request
at a time: a second request on a busy session gets 409 at once rather than queueing
silently behind a generation of unknown length.
"""

from __future__ import annotations

import abc
import copy
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.errors import NotFound, SessionBusy, TooManySessions


@dataclass
class Session:
    id: str
    model: str
    seed: int
    state: list[np.ndarray]  # one (layers, hidden) float32 array per state tensor: h (and c)
    rng: np.random.Generator
    logits: np.ndarray | None = None  # (vocab,) next-char logits; None before any input
    history_chars: int = 0
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)

    @classmethod
    def fresh(cls, model: str, state_shape: tuple[int, int], tensors: int, seed: int | None) -> Session:
        seed = seed if seed is not None else secrets.randbits(63)
        return cls(
            id=secrets.token_urlsafe(12),
            model=model,
            seed=seed,
            state=[np.zeros(state_shape, np.float32) for _ in range(tensors)],
            rng=np.random.default_rng(seed),
        )

    def reset(self) -> None:
        for s in self.state:
            s.fill(0.0)
        self.logits = None
        self.history_chars = 0
        self.rng = np.random.default_rng(self.seed)

    def fork(self, seed: int | None = None) -> Session:
        """A new session with a copy of the state; the same RNG stream unless a seed is given."""
        child = Session(
            id=secrets.token_urlsafe(12),
            model=self.model,
            seed=self.seed if seed is None else seed,
            state=[s.copy() for s in self.state],
            rng=copy.deepcopy(self.rng) if seed is None else np.random.default_rng(seed),
            logits=None if self.logits is None else self.logits.copy(),
            history_chars=self.history_chars,
        )
        return child

    @property
    def state_bytes(self) -> int:
        """Bytes of numeric state held: the recurrent state plus the next-char logits."""
        return sum(s.nbytes for s in self.state) + (0 if self.logits is None else self.logits.nbytes)

    def approx_bytes(self) -> int:
        """State plus bookkeeping (object, arrays' headers, RNG), as /metrics and the budget count it."""
        arrays = [*self.state, *([] if self.logits is None else [self.logits])]
        return (
            sys.getsizeof(self)
            + sys.getsizeof(self.__dict__)
            + sum(sys.getsizeof(a) for a in arrays)
            + sys.getsizeof(self.id)
            + 1100  # numpy Generator + PCG64 bit generator objects
        )


class SessionStore(abc.ABC):
    """Where sessions live between requests."""

    @abc.abstractmethod
    async def add(self, session: Session) -> None:
        """Store a new session; raises TooManySessions past the cap."""

    @abc.abstractmethod
    async def get(self, session_id: str) -> Session:
        """The session, or NotFound."""

    @abc.abstractmethod
    async def put(self, session: Session) -> None:
        """Save a session after a change (a no-op for memory; a write for a remote store)."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> None:
        """Remove a session, or NotFound."""

    @abc.abstractmethod
    async def acquire(self, session_id: str) -> Session:
        """The session, leased to the caller alone; SessionBusy if another request holds it."""

    @abc.abstractmethod
    async def release(self, session: Session) -> None:
        """Save the session and end the lease taken by `acquire`."""

    @abc.abstractmethod
    def expires_at(self, session: Session) -> float:
        """Wall-clock time (epoch seconds) at which the session expires if left idle."""

    @abc.abstractmethod
    async def evict_expired(self) -> int:
        """Drop sessions idle for longer than the TTL; returns how many went."""

    @abc.abstractmethod
    def stats(self) -> StoreStats:
        """Counts for /metrics."""


@dataclass(frozen=True)
class StoreStats:
    sessions: int
    busy: int
    state_bytes: int
    approx_bytes: int


class InMemorySessionStore(SessionStore):
    def __init__(self, ttl_s: float, max_sessions: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._busy: set[str] = set()

    def _expires_in(self, session: Session) -> float:
        return session.last_used + self.ttl_s - self._clock()

    def expires_at(self, session: Session) -> float:
        return time.time() + max(0.0, self._expires_in(session))

    async def add(self, session: Session) -> None:
        if len(self._sessions) >= self.max_sessions:
            await self.evict_expired()
        if len(self._sessions) >= self.max_sessions:
            soonest = min((self._expires_in(s) for s in self._sessions.values()), default=self.ttl_s)
            retry = max(1, int(soonest) + 1)
            raise TooManySessions(
                f"the server holds its maximum of {self.max_sessions} sessions; delete one or retry in {retry}s",
                headers={"Retry-After": str(retry)},
            )
        session.last_used = self._clock()
        self._sessions[session.id] = session

    async def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or (self._expires_in(session) <= 0 and session_id not in self._busy):
            raise NotFound(f"session {session_id!r} does not exist or has expired", field="session_id")
        session.last_used = self._clock()
        return session

    async def put(self, session: Session) -> None:
        session.last_used = self._clock()

    async def delete(self, session_id: str) -> None:
        if self._sessions.pop(session_id, None) is None:
            raise NotFound(f"session {session_id!r} does not exist or has expired", field="session_id")
        self._busy.discard(session_id)

    async def acquire(self, session_id: str) -> Session:
        session = await self.get(session_id)
        if session_id in self._busy:
            raise SessionBusy(
                f"session {session_id!r} is busy with another request; retry when it finishes",
                field="session_id",
            )
        self._busy.add(session_id)
        return session

    async def release(self, session: Session) -> None:
        self._busy.discard(session.id)
        session.last_used = self._clock()

    def is_busy(self, session_id: str) -> bool:
        return session_id in self._busy

    async def evict_expired(self) -> int:
        expired = [sid for sid, s in self._sessions.items() if sid not in self._busy and self._expires_in(s) <= 0]
        for sid in expired:
            del self._sessions[sid]
        return len(expired)

    def stats(self) -> StoreStats:
        sessions = self._sessions.values()
        return StoreStats(
            sessions=len(self._sessions),
            busy=len(self._busy),
            state_bytes=sum(s.state_bytes for s in sessions),
            approx_bytes=sum(s.approx_bytes() for s in sessions),
        )

"""Server-side sessions and where they live between requests.

A `Session` is plain data: the model's recurrent state, the next-character logits, the RNG's
full state, the seed and the history length. While a request runs, the session is *leased* to
it (one request per session at a time, across every replica); the scheduler works on a copy
in its slot arrays, and the request writes the new state back when it ends (write-back, not
write-through). The store is an interface with two homes:

- `InMemorySessionStore` (memory.py): this process's memory, the embedded default. Sessions are
  lost when the process stops and are not shared between workers.
- `RedisSessionStore` (redis_store.py): a Redis server shared by every worker and replica.
"""

from __future__ import annotations

import abc
import copy
import secrets
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from service.errors import ForeignSession, NotFound, SessionBusy, TooManySessions


@dataclass
class Session:
    id: str
    model: str
    seed: int
    state: list[np.ndarray]  # one (layers, hidden) float32 array per state tensor: h (and c)
    rng_state: dict[str, Any]  # numpy's PCG64 state: the RNG continues exactly where it stopped
    logits: np.ndarray | None = None  # (vocab,) next-char logits; None before any input
    history_chars: int = 0
    created_at: float = field(default_factory=time.time)
    expires_at: float = 0.0  # wall-clock; set by the store
    # The sha256 of the model file whose state this is (set by the store when the session is made):
    # after the model is swapped for another version, the session is refused, never read into it.
    model_sha256: str = ""
    # The name of the key that made it ("" on a server without keys): only that key finds it again.
    owner: str = ""
    last_char: str = ""  # the last character the state read ("" before any)

    @classmethod
    def fresh(cls, model: str, state_shape: tuple[int, int], tensors: int, seed: int | None) -> Session:
        seed = seed if seed is not None else secrets.randbits(63)
        return cls(
            id=secrets.token_urlsafe(12),
            model=model,
            seed=seed,
            state=[np.zeros(state_shape, np.float32) for _ in range(tensors)],
            rng_state=seeded_rng_state(seed),
        )

    def rng(self) -> np.random.Generator:
        """A generator positioned where this session's RNG stopped."""
        generator = np.random.Generator(np.random.PCG64())
        generator.bit_generator.state = self.rng_state
        return generator

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.rng_state = seeded_rng_state(seed)

    def reset(self) -> None:
        for s in self.state:
            s.fill(0.0)
        self.logits = None
        self.history_chars = 0
        self.rng_state = seeded_rng_state(self.seed)

    def fork(self, seed: int | None = None) -> Session:
        """A new session with a copy of the state; the same RNG stream unless a seed is given."""
        return replace(
            self,
            id=secrets.token_urlsafe(12),
            seed=self.seed if seed is None else seed,
            state=[s.copy() for s in self.state],
            rng_state=copy.deepcopy(self.rng_state) if seed is None else seeded_rng_state(seed),
            logits=None if self.logits is None else self.logits.copy(),
            created_at=time.time(),
        )

    @property
    def state_bytes(self) -> int:
        """Bytes of numeric state held: the recurrent state plus the next-char logits."""
        return sum(s.nbytes for s in self.state) + (0 if self.logits is None else self.logits.nbytes)

    def approx_bytes(self) -> int:
        """State plus bookkeeping (object, arrays' headers, RNG state), as /metrics counts it."""
        arrays = [*self.state, *([] if self.logits is None else [self.logits])]
        return (
            sys.getsizeof(self)
            + sys.getsizeof(self.__dict__)
            + sum(sys.getsizeof(a) for a in arrays)
            + sys.getsizeof(self.id)
            + 400  # the RNG state dict
        )


def seeded_rng_state(seed: int) -> dict[str, Any]:
    return rng_state_of(np.random.PCG64(seed))


def rng_state_of(bit_generator: np.random.BitGenerator) -> dict[str, Any]:
    """The bit generator's full state as plain data (what a session record stores)."""
    return dict(bit_generator.state)


@dataclass(frozen=True)
class Lease:
    """The right to run one request on a session; `token` fences out a holder that lost it."""

    session_id: str
    token: int
    owner: str = ""


@dataclass(frozen=True)
class Owner:
    """Whose sessions a request may touch: its key's name ("" on a server without keys, where every
    caller's sessions are everyone's), and how many sessions that key may hold at once (None: no limit
    but the server's)."""

    name: str = ""
    max_sessions: int | None = None


ANYONE = Owner()  # the caller on a server without keys


@dataclass(frozen=True)
class StoreStats:
    sessions: int  # held by the store (for a shared store: by every replica)
    busy: int  # leased by this process
    state_bytes: int
    approx_bytes: int


class SessionStore(abc.ABC):
    """Where sessions live between requests. Every method may raise StoreUnavailable."""

    ttl_s: float
    models: dict[str, str]  # model id -> sha256 of the file served now (updated in place by a swap)

    def version_of(self, session: Session) -> str:
        """The model version a new session gets: the file served now."""
        return self.models.get(session.model, "")

    def check_version(self, session: Session) -> Session:
        """The session, unless the model it was made with has been swapped for another version (409)."""
        served = self.models.get(session.model)
        if served and session.model_sha256 and served != session.model_sha256:
            raise model_swapped(session, served)
        return session

    @abc.abstractmethod
    def describe(self) -> str:
        """What the store is, for logs and errors (no secrets)."""

    @abc.abstractmethod
    async def create(self, session: Session, max_owned: int | None = None) -> None:
        """Store a new session for `session.owner`; TooManySessions past the server's cap, or past
        `max_owned` sessions held by that owner."""

    @abc.abstractmethod
    async def get(self, session_id: str, owner: str = "") -> Session:
        """The session as last saved (a read counts as use), or NotFound (also when `owner` did not
        make it: another key's session is not there for this one)."""

    @abc.abstractmethod
    async def lease(self, session_id: str, owner: str = "") -> tuple[Session, Lease]:
        """The session, leased to the caller alone; SessionBusy while another request holds it;
        NotFound for another owner's session (which that caller can neither read nor hold up)."""

    @abc.abstractmethod
    async def save(self, session: Session, lease: Lease, release: bool = True) -> bool:
        """Write the session back (and end the lease); False if the lease was lost meanwhile."""

    @abc.abstractmethod
    async def release(self, lease: Lease) -> None:
        """End a lease without saving: the session keeps its state from before the request."""

    @abc.abstractmethod
    async def delete(self, lease: Lease) -> None:
        """Remove a leased session."""

    @abc.abstractmethod
    async def evict_expired(self) -> int:
        """Drop sessions idle for longer than the TTL (a shared store may do this by itself)."""

    @abc.abstractmethod
    async def stats(self) -> StoreStats:
        """Counts for /metrics."""

    async def check(self) -> None:  # noqa: B027 (a store in this process always answers)
        """Raise StoreUnavailable unless the store answers (for /readyz)."""

    async def close(self) -> None:  # noqa: B027 (nothing to release by default)
        """Release connections."""


# The errors every store answers with, worded once.
def session_not_found(session_id: str) -> NotFound:
    return NotFound(f"session {session_id!r} does not exist or has expired", field="session_id")


def session_busy(session_id: str, retry_s: int) -> SessionBusy:
    return SessionBusy(
        f"session {session_id!r} is busy with another request; retry when it finishes",
        field="session_id",
        headers={"Retry-After": str(retry_s)},
    )


def model_swapped(session: Session, served: str) -> ForeignSession:
    return ForeignSession(
        f"session {session.id!r} was made with another version of model {session.model!r} "
        f"(file sha256 {session.model_sha256[:12]}..., this server has {served[:12]}...); start a new session",
        field="session_id",
    )


def too_many_owned(owner: str, max_sessions: int, retry_s: int) -> TooManySessions:
    return TooManySessions(
        f"key {owner!r} holds its maximum of {max_sessions} sessions (max_sessions); delete one or retry in {retry_s}s",
        headers={"Retry-After": str(retry_s)},
    )


def too_many_sessions(max_sessions: int, retry_s: int, where: str) -> TooManySessions:
    return TooManySessions(
        f"{where} {max_sessions} sessions; delete one or retry in {retry_s}s",
        headers={"Retry-After": str(retry_s)},
    )

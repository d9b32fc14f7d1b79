"""Sessions under a lease, and the jobs that end one.

A leased session belongs to one request at a time, across every replica. A block under `leased`
that raises gives the lease back (nothing saved); one that ends normally has handed the lease on:
to a job, a save or a delete. A job started with a lease writes the session back when it ends, its
final state, logits and RNG, in a fenced save (a request that lost its lease never overwrites newer
state), and so ends the lease; the future it returns says how that went, and the job's final event
is delivered only after it. A job with no lease (a throwaway session) writes nothing back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import numpy as np

from service.core.constraints import CharMatcher
from service.core.jobs import Job, Mailbox, Phase
from service.core.sampling import SamplingParams
from service.errors import ApiError, InternalError, LeaseLost
from service.serving.registry import LoadedModel
from service.serving.resources import Resources
from service.sessions.store import ANYONE, Lease, Owner, Session, SessionStore, rng_state_of

log = logging.getLogger("charstream.serving")

ChunkKeeper = Callable[[int, list[np.ndarray], np.ndarray], None]  # a job's `on_chunk`
Saved = asyncio.Future[ApiError | None]  # a leased job's write-back: None when the session was saved


def fresh_session(model: LoadedModel, seed: int | None, owner: Owner = ANYONE) -> Session:
    """A session with no history: zero state, no logits, an RNG from `seed` (a random one if None)."""
    info = model.engine.info
    session = Session.fresh(model.id, info.state_shape_per_row, len(info.state_names), seed)
    session.owner = owner.name
    return session


@contextlib.asynccontextmanager
async def leased(store: SessionStore, session_id: str, owner: Owner) -> AsyncIterator[tuple[Session, Lease]]:
    """`owner`'s session under a lease (another owner's is not found). A block that raises gives the
    lease back (nothing saved); one that ends normally has handed the lease on: to a job (which
    writes back), a save or a delete."""
    session, lease = await store.lease(session_id, owner.name)
    try:
        yield session, lease
    except BaseException:
        await store.release(lease)
        raise


async def save(store: SessionStore, session: Session, lease: Lease) -> None:
    """Save the session and end its lease; 409 lease_lost when another request took the lease over."""
    if not await store.save(session, lease):
        raise LeaseLost(
            f"session {session.id!r} was taken over by another request while this one ran; "
            "its state is the newer request's",
            field="session_id",
        )


def start_job(
    res: Resources,
    session: Session,
    lease: Lease | None,
    model: LoadedModel,
    ids: list[int],
    params: SamplingParams,
    matcher: CharMatcher | None = None,
    on_chunk: ChunkKeeper | None = None,
    keep: bool = False,
    group: object | None = None,
) -> tuple[Job, Saved | None]:
    """Submit the job; with a lease, its end writes the session back (the future says how that went).
    With `keep` and no lease, its end leaves the final state in `session` (not stored anywhere)."""
    rng = session.rng()
    saved: Saved | None = None
    if lease is not None:
        saved = asyncio.get_running_loop().create_future()

    def on_complete(job: Job) -> None:
        # On the event loop, with the job's final event: write back, then end the lease.
        if job.phase is not Phase.FAILED and (lease is not None or keep):
            session.state = job.state
            session.logits = job.logits
            session.history_chars += job.absorbed
            session.rng_state = rng_state_of(rng.bit_generator)
            if (last := job.last_char) is not None:
                session.last_char = model.engine.info.vocab[last]
        if lease is None or saved is None:
            return
        res.in_background(_write_back(res.store, session, lease, job.phase is not Phase.FAILED, saved))

    job = Job(
        prompt=ids,
        state=list(session.state),
        logits=session.logits,
        params=params,
        rng=rng,
        wants_state=lease is not None or keep,
        on_complete=on_complete,
        on_chunk=on_chunk,
        matcher=matcher,
        events=Mailbox(res.settings.stream_interval),
        group=group,
    )
    res.schedulers[model.id].submit(job)
    return job, saved


async def _write_back(store: SessionStore, session: Session, lease: Lease, keep: bool, saved: Saved) -> None:
    """Save the session's new state (or, for a failed job, only end the lease); never raises (the outcome
    goes to `saved`)."""
    outcome: ApiError | None = None
    try:
        if keep:
            await save(store, session, lease)
        else:
            await store.release(lease)
    except ApiError as exc:
        outcome = exc
        log.error("session not saved", extra={"error": exc.message})
    except Exception:
        log.exception("session not saved")
        outcome = InternalError("the session's new state could not be saved")
    if not saved.done():
        saved.set_result(outcome)

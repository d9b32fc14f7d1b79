"""What a session's own routes do: create one (reading its prompt), read it, delete, reset, fork,
and feed it text (with the fed text's logprobs or ranks when asked). Generating on a session is
in generate.py; the leases and write-backs under all of them are in leases.py.
"""

from __future__ import annotations

from service.core.events import PromptEvent
from service.core.generation import Generation
from service.core.sampling import SamplingParams
from service.errors import TooLarge
from service.serving.checks import MAX_ANNOTATED_PROMPT, prompt_ids
from service.serving.leases import fresh_session, leased, save, start_job
from service.serving.registry import LoadedModel
from service.serving.resources import Resources
from service.sessions.store import Lease, Owner, Session


class SessionOps:
    def __init__(self, res: Resources) -> None:
        self.res = res

    async def create(
        self, model_id: str | None, prompt: str, seed: int | None, owner: Owner, start: Session | None = None
    ) -> Session:
        """A new session of `owner`'s: fresh, or holding `start`'s state (an imported one); `prompt` read after it."""
        self.res.refuse_when_draining()
        model = self.res.registry.get(model_id if start is None else start.model)
        ids = prompt_ids(self.res, model, prompt, "prompt")
        if start is None:
            session = fresh_session(model, seed, owner)
        else:
            session = start
            session.owner = owner.name
            if seed is not None:
                session.reseed(seed)
        await self.res.store.create(session, owner.max_sessions)
        if ids:
            async with leased(self.res.store, session.id, owner) as (session, lease):
                feeding = self._feed_job(session, lease, model, ids)
            await feeding.result()
        return session

    async def get(self, session_id: str, owner: Owner) -> Session:
        return await self.res.store.get(session_id, owner.name)

    async def delete(self, session_id: str, owner: Owner) -> None:
        async with leased(self.res.store, session_id, owner) as (_, lease):  # 409 while a request runs on it
            await self.res.store.delete(lease)

    async def reset(self, session_id: str, owner: Owner) -> Session:
        async with leased(self.res.store, session_id, owner) as (session, lease):
            session.reset()
            await save(self.res.store, session, lease)
        return session

    async def fork(self, session_id: str, seed: int | None, owner: Owner) -> Session:
        self.res.refuse_when_draining()
        async with leased(self.res.store, session_id, owner) as (session, lease):
            child = session.fork(seed)  # the same owner: a fork counts against the key's sessions
            await self.res.store.create(child, owner.max_sessions)
            await self.res.store.release(lease)
        return child

    async def feed(self, session_id: str, text: str, owner: Owner) -> tuple[Session, int]:
        session, n, _ = await self.feed_scored(session_id, text, SamplingParams(max_new_chars=0), owner)
        return session, n

    async def feed_scored(
        self, session_id: str, text: str, params: SamplingParams, owner: Owner
    ) -> tuple[Session, int, PromptEvent | None]:
        """Feed a session, with the fed text's logprobs or ranks when `params` asks (read in chunks, batched)."""
        self.res.refuse_when_draining()
        async with leased(self.res.store, session_id, owner) as (session, lease):
            model = self.res.registry.get(session.model)
            ids = prompt_ids(self.res, model, text, "text")
            if params.annotates_prompt and len(ids) > MAX_ANNOTATED_PROMPT:
                raise TooLarge(
                    f"text has {len(ids)} characters; per-character logprobs of a text are limited to "
                    f"{MAX_ANNOTATED_PROMPT}",
                    field="text",
                )
            feeding = self._feed_job(session, lease, model, ids, params)
        result = await feeding.result()
        return session, len(ids), result.prompt

    def _feed_job(
        self,
        session: Session,
        lease: Lease,
        model: LoadedModel,
        ids: list[int],
        params: SamplingParams | None = None,
    ) -> Generation:
        """Start reading `ids` into a leased session; its end saves the session and ends the lease."""
        job, saved = start_job(self.res, session, lease, model, ids, params or SamplingParams(max_new_chars=0))
        scheduler = self.res.schedulers[model.id]
        return Generation(job, scheduler, model.id, session.id, len(ids), saved=saved)

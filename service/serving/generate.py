"""Generations: stateless ones on a throwaway session, and ones that continue a leased session.

Both kinds go through `_prepare` (check the parameters, compile the constraint, take the ids to read
first), then become a job for the model's scheduler; the caller consumes the returned `Generation`.

- Stateless: the throwaway session starts from the prompt-state cache's state after the longest
  prefix of its prompt read before (`_from_prompt_cache`). A model swapped while the request waited
  (for its constraint, or for Redis) starts it again on the new version, a few times at most.
- Session: the session is leased to this request alone, and the job's end writes it back. A model
  swapped while the constraint compiled refuses the session (409 session_model_mismatch), as any
  later request on it is refused.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from service.core.constraints import CharMatcher
from service.core.generation import Generation
from service.core.jobs import Job
from service.core.sampling import SamplingParams
from service.errors import InvalidInput, ModelUnavailable
from service.serving import spans
from service.serving.checks import check_params, start_ids
from service.serving.compiles import ConstraintCompiles
from service.serving.leases import ChunkKeeper, Saved, fresh_session, leased, start_job
from service.serving.prompt_cache import PrefixPlan
from service.serving.registry import LoadedModel
from service.serving.resources import Resources
from service.sessions.store import ANYONE, Owner, Session, model_swapped

# How often a stateless request starts again on a model swapped under it before it gives up (503).
SWAP_ATTEMPTS = 3


@dataclass(frozen=True)
class Prepared:
    """A request checked against its model: its constraint's matcher and the ids its job reads first."""

    matcher: CharMatcher | None
    ids: list[int]


class Generations:
    def __init__(self, res: Resources, compiles: ConstraintCompiles) -> None:
        self.res = res
        self.compiles = compiles

    async def generate(
        self,
        params: SamplingParams,
        prompt: str = "",
        model_id: str | None = None,
        seed: int | None = None,
        session_id: str | None = None,
        owner: Owner = ANYONE,
        start: Session | None = None,
        keep: bool = False,
        group: object | None = None,
    ) -> Generation:
        """Validate, take `owner`'s session (or make a throwaway one, or start from `start`, a session
        no store holds), and start the job; with `keep`, its end leaves the final state in `start`."""
        if session_id is None:
            model, job, saved = await self._stateless(params, prompt, model_id, seed, start, keep, group)
        else:
            model, job, saved = await self._on_session(params, prompt, model_id, seed, session_id, owner)
        return Generation(
            job,
            self.res.schedulers[model.id],
            model.id,
            session_id,
            len(prompt),
            on_stream=spans.traced(self.res.track_stream, model.id, session_id),
            saved=saved,
        )

    async def read_prompt_once(self, params: SamplingParams, prompt: str, model_id: str | None) -> None:
        """Before several stateless generations of one prompt start, read it once into the prompt-state
        cache, so that each of them starts from the state after it instead of reading it again.

        Does nothing when the cache would not serve them (a short prompt, annotations, penalties) or
        already holds the whole prompt. Their text is the same as without it.
        """
        self.res.refuse_when_draining()
        model = self.res.registry.get(model_id)
        check_params(self.res.settings, model, params, len(prompt))
        session = fresh_session(model, None)
        ids, keeper = await self._from_prompt_cache(model, session, start_ids(self.res, model, session, prompt), params)
        if keeper is None or not ids or not self.res.serves(model):
            return  # nothing to read, or the model was swapped meanwhile: each generation reads it itself
        job, _ = start_job(self.res, session, None, model, ids, SamplingParams(max_new_chars=0), on_chunk=keeper)
        reading = Generation(job, self.res.schedulers[model.id], model.id, None, len(ids))
        try:
            await reading.result()
        except BaseException:
            reading.cancel()
            raise

    async def _stateless(
        self,
        params: SamplingParams,
        prompt: str,
        model_id: str | None,
        seed: int | None,
        start: Session | None = None,
        keep: bool = False,
        group: object | None = None,
    ) -> tuple[LoadedModel, Job, Saved | None]:
        """A job on a throwaway session (or `start`), started on the version of the model serving when
        it is submitted. A state given in `start` belongs to one version: a swap under it refuses it."""
        for _ in range(SWAP_ATTEMPTS):
            self.res.refuse_when_draining()
            model = self.res.registry.get(model_id if start is None else start.model)
            if start is not None and start.model_sha256 != model.sha256:
                raise model_swapped(start, model.sha256)
            session = fresh_session(model, seed) if start is None else start
            if start is not None and seed is not None:
                start.reseed(seed)
            prepared = await self._prepare(model, session, params, prompt)
            if prepared is None:
                continue  # swapped while the constraint compiled
            ids, keeper = prepared.ids, None
            if session.logits is None and not session.history_chars:  # the cache holds states read from zero
                ids, keeper = await self._from_prompt_cache(model, session, prepared.ids, params)
            if self.res.serves(model):  # else swapped while asking Redis: start again on the new version
                job, saved = start_job(
                    self.res, session, None, model, ids, params, prepared.matcher, keeper, keep, group
                )
                return model, job, saved
        raise ModelUnavailable(
            f"model {model.id!r} was swapped {SWAP_ATTEMPTS} times while this request started; retry it",
            field="model",
        )

    async def _on_session(
        self,
        params: SamplingParams,
        prompt: str,
        model_id: str | None,
        seed: int | None,
        session_id: str,
        owner: Owner,
    ) -> tuple[LoadedModel, Job, Saved | None]:
        """A job continuing the leased session; its end writes the session back and ends the lease."""
        self.res.refuse_when_draining()
        async with leased(self.res.store, session_id, owner) as (session, lease):
            if model_id is not None and model_id != session.model:
                raise InvalidInput(
                    f"session {session_id!r} belongs to model {session.model!r}, not {model_id!r}",
                    field="model",
                )
            model = self.res.registry.get(session.model)
            prepared = await self._prepare(model, session, params, prompt)
            if prepared is None:
                raise model_swapped(session, self.res.registry.get(model.id).sha256)
            if seed is not None:
                session.reseed(seed)
            # Inside the block: if starting the job raises, the lease is given back.
            job, saved = start_job(self.res, session, lease, model, prepared.ids, params, prepared.matcher)
        return model, job, saved

    async def _prepare(
        self, model: LoadedModel, session: Session, params: SamplingParams, prompt: str
    ) -> Prepared | None:
        """Check the request against `model`, compile its constraint, and take the ids its job reads first;
        None when the model was swapped while the constraint compiled."""
        check_params(self.res.settings, model, params, len(prompt))
        matcher = await self.compiles.matcher(model, params)
        if not self.res.serves(model):
            return None
        return Prepared(matcher, start_ids(self.res, model, session, prompt))

    async def _from_prompt_cache(
        self, model: LoadedModel, session: Session, ids: list[int], params: SamplingParams
    ) -> tuple[list[int], ChunkKeeper | None]:
        """The part of a stateless prompt left to read, from the state after its longest cached prefix.

        Only prompts of at least one prefill chunk take part: shorter ones cost little to read, and
        would crowd the longer prefixes out of the cache. Prompts read one character per step (their
        characters annotated) and penalised requests (the repetition penalty counts the prompt's
        characters as seen) always read the whole prompt. What the job reads, it keeps at chunk boundaries.
        With a shared cache, Redis is asked for the prefixes longer than this process holds.
        """
        chunk, cache, metrics = self.res.settings.prefill_chunk, self.res.prompt_cache, self.res.metrics
        if cache.max_bytes == 0 or len(ids) < chunk or params.annotates_prompt or params.penalised:
            return ids, None
        plan = cache.plan(model.sha256, ids, chunk)
        shared = self.res.shared_states
        if shared is not None and plan.digests:
            found = await shared.longest(plan.digests, model.engine.info)
            if found is not None:
                end, state = found
                cache.put(plan.digests[end], list(state.state), state.logits)
                plan = PrefixPlan(end, state, {p: d for p, d in plan.digests.items() if p > end})
                metrics.prompt_cache_shared_hits.labels(model.id).inc()
        metrics.prefix_cache_queries.labels(model.id).inc(len(ids))
        metrics.prefix_cache_hits.labels(model.id).inc(plan.start if plan.hit is not None else 0)
        if plan.hit is None:
            metrics.prompt_cache_misses.labels(model.id).inc()
        else:
            metrics.prompt_cache_hits.labels(model.id).inc()
            metrics.prompt_cache_chars.labels(model.id).inc(plan.start)
            session.state = list(plan.hit.state)  # the scheduler copies it into its slot table
            session.logits = plan.hit.logits
        return ids[plan.start :], cache.keeper(plan, shared, asyncio.get_running_loop())

"""The generation service: the serving logic between the routes (HTTP only) and the schedulers.

A request's path through `generate`:

1. Check: the drain, the model, the sampling parameters and the prompt against the model's
   vocabulary and the settings' limits. Everything a request can get wrong fails here, before a
   stream starts, so a bad request is an HTTP error and never a broken stream.
2. Lease: a session request takes its session from the store, leased to it alone (one request per
   session at a time across every replica); a stateless one gets a throwaway session, which starts
   from the prompt-state cache's state after the longest prefix of its prompt read before.
3. Job: the prompt's ids, the session's state, logits and RNG become a `Job`, submitted to the
   model's scheduler, which reads the prompt in chunks and steps it with every other job.
4. Stream: the caller consumes the returned `Generation`, events as the scheduler emits them.
5. Write-back: when the job ends, its final state, logits and RNG are saved into the session and
   the lease ends (a fenced save: a request that lost its lease never overwrites newer state).
6. Final event: the done (or error) event is delivered only after the write-back, so a client that
   saw `done` can continue from exactly that state.

`GenerationService.create(registry, settings)` builds one, with its store and schedulers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from service.core.constraints import CharMatcher, Compiled, ConstraintError
from service.core.engine import Engine
from service.core.events import PromptEvent
from service.core.generation import Generation
from service.core.jobs import Job, Mailbox, Phase
from service.core.sampling import SamplingParams, SteerSpec
from service.core.scheduler import Scheduler
from service.errors import ApiError, InternalError, InvalidInput, LeaseLost, ShuttingDown, TooLarge
from service.metrics import Metrics
from service.serving import spans
from service.serving.prompt_cache import PrefixPlan, PromptCache, SharedStates
from service.serving.registry import LoadedModel, ModelRegistry
from service.sessions import open_store
from service.sessions.store import Lease, Session, SessionStore, model_swapped, rng_state_of
from service.settings import Settings

log = logging.getLogger("charstream.serving")

ChunkKeeper = Callable[[int, list[np.ndarray], np.ndarray], None]  # a job's `on_chunk`

# What a session with no history reads first when the request brings no prompt.
DEFAULT_START = "\n"
# Per-character annotations of a prompt are read one character per step and sent as one event:
# bounded so that the answer stays a reasonable size (32 units x 10,000 characters ~ 3 MB of JSON).
MAX_ANNOTATED_PROMPT = 10_000
# Characters one score request may bring, over all its texts: about a minute of reading on two cores.
MAX_SCORE_CHARS = 1_000_000
# The RNG of jobs that draw nothing (texts being scored).
_NO_DRAWS = np.random.default_rng(0)
# How long a request waits for its constraint to compile (llguidance's own limits bound the work).
COMPILE_TIMEOUT_S = 5.0
# Constraints compile on threads of their own: a burst of costly ones waits for these rather than
# taking the default executor (session stores, file reads) or every core.
COMPILE_THREADS = 2
# How long a drain waits, after ending what was left, for streams to send their final frames.
FINAL_FRAMES_WAIT_S = 3.0


def new_scheduler(name: str, engine: Engine, settings: Settings, metrics: Metrics) -> Scheduler:
    return Scheduler(
        name,
        engine,
        metrics,
        max_batch_size=settings.max_batch_size,
        max_wait_us=settings.max_wait_us,
        batching=settings.batching,
        prefill_chunk=settings.prefill_chunk,
    )


class GenerationService:
    def __init__(
        self,
        registry: ModelRegistry,
        store: SessionStore,
        schedulers: dict[str, Scheduler],
        settings: Settings,
        metrics: Metrics,
        prompt_cache: PromptCache | None = None,
        shared_states: SharedStates | None = None,
    ) -> None:
        self.registry = registry
        # States after prompt prefixes, for stateless requests (bounded by CHARSTREAM_PROMPT_CACHE_BYTES).
        self.prompt_cache = prompt_cache or PromptCache(settings.prompt_cache_bytes)
        self.shared_states = shared_states  # with CHARSTREAM_PROMPT_CACHE_SHARED: the states in Redis too
        self.store = store
        self.schedulers = schedulers
        self.settings = settings
        self.metrics = metrics
        self.draining = False
        self._background: set[asyncio.Task[None]] = set()
        self._streams: set[Generation] = set()  # streams being sent right now
        # Called at the end of a drain: the open WebSocket connections close themselves (1001).
        self.connection_closers: set[Callable[[], Awaitable[None]]] = set()
        # Schedulers of versions replaced by a model swap, finishing the generations they hold.
        self.retired: set[Scheduler] = set()
        self._compiles = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="constraints")

    @classmethod
    def create(cls, registry: ModelRegistry, settings: Settings, metrics: Metrics | None = None) -> GenerationService:
        metrics = metrics or Metrics()
        schedulers = {
            name: new_scheduler(name, model.engine, settings, metrics) for name, model in registry.models.items()
        }
        store = open_store(
            settings.session_store,
            ttl_s=settings.session_ttl_s,
            max_sessions=settings.max_sessions,
            lease_ttl_s=settings.lease_ttl_s,
            models={m.id: m.sha256 for m in registry.models.values()},
            wait_replicas=settings.redis_wait_replicas,
        )
        shared = None
        if settings.prompt_cache_shared:
            from service.sessions.redis_store import RedisSessionStore

            assert isinstance(store, RedisSessionStore)  # the settings refuse a shared cache without Redis
            shared = SharedStates(store.client, settings.session_ttl_s)
        return cls(registry, store, schedulers, settings, metrics, shared_states=shared)

    def new_scheduler(self, name: str, engine: Engine) -> Scheduler:
        """A scheduler for another version of a model (a swap), set up as the others."""
        return new_scheduler(name, engine, self.settings, self.metrics)

    def start(self) -> None:
        sys.setswitchinterval(self.settings.switch_interval_us / 1e6)
        for scheduler in self.schedulers.values():
            scheduler.start()

    async def stop(self) -> None:
        for scheduler in self.schedulers.values():
            await scheduler.stop()
        for task in list(self._background):
            await task
        await self.store.close()
        self._compiles.shutdown(wait=False, cancel_futures=True)

    @property
    def running(self) -> int:
        """Generations and feeds not yet finished, over every model (and version being retired)."""
        return sum(s.active for s in [*self.schedulers.values(), *self.retired])

    async def drain(self, grace_s: float) -> None:
        """Graceful shutdown: refuse new work, let running generations finish for up to `grace_s`,
        end the rest with a `shutting_down` error, and give streams time to send their last frame."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.running and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.running:
            log.warning("ending generations still running at shutdown", extra={"count": self.running})
            for scheduler in [*self.schedulers.values(), *self.retired]:
                scheduler.abort_all("shutting_down", "the server is shutting down; retry the request")
        deadline = loop.time() + FINAL_FRAMES_WAIT_S
        while (self.running or self._streams) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.gather(*(close() for close in list(self.connection_closers)), return_exceptions=True)
        for task in list(self._background):
            await task

    def _track_stream(self, generation: Generation, open_: bool) -> None:
        if open_:
            self._streams.add(generation)
        else:
            self._streams.discard(generation)

    def _refuse_when_draining(self) -> None:
        if self.draining:
            raise ShuttingDown()

    # -- validation --------------------------------------------------------------------------------

    def _prompt_ids(self, model: LoadedModel, text: str, field: str) -> list[int]:
        if len(text) > self.settings.max_prompt_chars:
            raise TooLarge(
                f"{field} has {len(text)} characters; the limit is {self.settings.max_prompt_chars}",
                field=field,
            )
        ids = self.registry.encode(model, text, field)
        self.metrics.prompt_chars.labels(model.id).inc(len(ids))
        return ids

    def _check_params(self, model: LoadedModel, params: SamplingParams, prompt_chars: int) -> None:
        """What only the model and the settings can bound: 422 naming the field."""
        info = model.engine.info
        if params.max_new_chars > self.settings.max_new_chars:
            raise InvalidInput(
                f"max_new_chars is {params.max_new_chars}; the limit is {self.settings.max_new_chars}",
                field="max_new_chars",
            )
        if params.top_k > info.vocab_size:
            raise InvalidInput(
                f"top_k is {params.top_k}; model {model.id!r} has {info.vocab_size} characters",
                field="top_k",
            )
        if params.top_logprobs > info.vocab_size:
            raise InvalidInput(
                f"top_logprobs is {params.top_logprobs}; model {model.id!r} has {info.vocab_size} characters",
                field="top_logprobs",
            )
        spec = params.activations
        if spec is not None:
            if spec.layer >= info.num_layers:
                raise InvalidInput(
                    f"activations.layer is {spec.layer}; model {model.id!r} has layers 0..{info.num_layers - 1}",
                    field="activations.layer",
                )
            if spec.tensor >= len(info.state_names):
                raise InvalidInput(
                    f"activations.state 'c' exists only for LSTM models; {model.id!r} is a {info.cell}: use 'h'",
                    field="activations.state",
                )
            if max(spec.units) >= info.hidden_size:
                raise InvalidInput(
                    f"activations.units has {max(spec.units)}; model {model.id!r} has units 0..{info.hidden_size - 1}",
                    field="activations.units",
                )
        for i, steer in enumerate(params.steer):
            self._check_steer(model, steer, f"steer.{i}")
        if params.annotates_prompt and prompt_chars > MAX_ANNOTATED_PROMPT:
            raise TooLarge(
                f"prompt has {prompt_chars} characters; per-character annotations of a prompt are limited to "
                f"{MAX_ANNOTATED_PROMPT}",
                field="prompt",
            )

    @staticmethod
    def _check_steer(model: LoadedModel, steer: SteerSpec, field: str) -> None:
        info = model.engine.info
        if steer.layer >= info.num_layers:
            raise InvalidInput(
                f"{field}.layer is {steer.layer}; model {model.id!r} has layers 0..{info.num_layers - 1}",
                field=f"{field}.layer",
            )
        if steer.tensor >= len(info.state_names):
            raise InvalidInput(
                f"{field}.state 'c' exists only for LSTM models; {model.id!r} is a {info.cell}: use 'h'",
                field=f"{field}.state",
            )
        if steer.unit >= info.hidden_size:
            raise InvalidInput(
                f"{field}.unit is {steer.unit}; model {model.id!r} has units 0..{info.hidden_size - 1}",
                field=f"{field}.unit",
            )

    async def _matcher(self, model: LoadedModel, params: SamplingParams) -> CharMatcher | None:
        """The job's compiled constraint (cached per model), or a 422 naming the field, before any step."""
        if params.constraint is None:
            return None
        return (await self._compiled(model, params)).new()

    async def check_constraint_rows(self, params: SamplingParams, model_id: str, rows: int, field: str) -> None:
        """Refuse (naming `field`) a request that would run its constraint on `rows` rows at once when their
        masks together would add more than the step budget to every step of the model's streams."""
        if params.constraint is None or rows <= 1:
            return
        model = self.registry.get(model_id)
        at_once = min(rows, self.schedulers[model.id].max_batch_size)
        try:
            (await self._compiled(model, params)).check_rows(at_once)
        except ConstraintError as exc:
            raise InvalidInput(
                f"{params.constraint.field} cannot run on {rows} choices at once with model {model.id!r}: {exc}",
                field=field,
            ) from exc

    async def _compiled(self, model: LoadedModel, params: SamplingParams) -> Compiled:
        """Compiled on the compile threads, and waited for at most COMPILE_TIMEOUT_S (the probe ends a
        costly compile soon after; its verdict is cached, and a retry joins the compile in flight)."""
        spec = params.constraint
        assert spec is not None
        compiler = self.schedulers[model.id].constraints
        try:
            compiling = asyncio.wrap_future(compiler.submit(spec, self._compiles))
            # Shielded: the compile is shared by every request asking for it, and kept if this one gives up.
            return await asyncio.wait_for(asyncio.shield(compiling), COMPILE_TIMEOUT_S)
        except ConstraintError as exc:
            raise InvalidInput(f"{spec.field} cannot be used with model {model.id!r}: {exc}", field=spec.field) from exc
        except TimeoutError as exc:
            raise InvalidInput(
                f"{spec.field} took longer than {COMPILE_TIMEOUT_S:.0f} s to compile: simplify it", field=spec.field
            ) from exc

    # -- sessions ----------------------------------------------------------------------------------

    def _new_session(self, model: LoadedModel, seed: int | None) -> Session:
        info = model.engine.info
        return Session.fresh(model.id, info.state_shape_per_row, len(info.state_names), seed)

    @contextlib.asynccontextmanager
    async def _leased(self, session_id: str) -> AsyncIterator[tuple[Session, Lease]]:
        """The session under a lease. A block that raises gives the lease back (nothing saved); one that
        ends normally has handed the lease on: to a job (which writes back), a save or a delete."""
        session, lease = await self.store.lease(session_id)
        try:
            yield session, lease
        except BaseException:
            await self.store.release(lease)
            raise

    async def create_session(self, model_id: str | None, prompt: str, seed: int | None) -> Session:
        self._refuse_when_draining()
        model = self.registry.get(model_id)
        ids = self._prompt_ids(model, prompt, "prompt")
        session = self._new_session(model, seed)
        await self.store.create(session)
        if ids:
            async with self._leased(session.id) as (session, lease):
                feeding = self._feed_job(session, lease, model, ids)
            await feeding.result()
        return session

    async def get_session(self, session_id: str) -> Session:
        return await self.store.get(session_id)

    async def delete_session(self, session_id: str) -> None:
        async with self._leased(session_id) as (_, lease):  # 409 while a request runs on it
            await self.store.delete(lease)

    async def reset_session(self, session_id: str) -> Session:
        async with self._leased(session_id) as (session, lease):
            session.reset()
            await self._save(session, lease)
        return session

    async def fork_session(self, session_id: str, seed: int | None) -> Session:
        self._refuse_when_draining()
        async with self._leased(session_id) as (session, lease):
            child = session.fork(seed)
            await self.store.create(child)
            await self.store.release(lease)
        return child

    async def _save(self, session: Session, lease: Lease) -> None:
        if not await self.store.save(session, lease):
            raise LeaseLost(
                f"session {session.id!r} was taken over by another request while this one ran; "
                "its state is the newer request's",
                field="session_id",
            )

    async def feed(self, session_id: str, text: str) -> tuple[Session, int]:
        session, n, _ = await self.feed_scored(session_id, text, SamplingParams(max_new_chars=0))
        return session, n

    async def feed_scored(
        self, session_id: str, text: str, params: SamplingParams
    ) -> tuple[Session, int, PromptEvent | None]:
        """Feed a session, with the fed text's logprobs or ranks when `params` asks (read in chunks, batched)."""
        self._refuse_when_draining()
        async with self._leased(session_id) as (session, lease):
            model = self.registry.get(session.model)
            ids = self._prompt_ids(model, text, "text")
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
        job, saved = self._job(session, lease, model, ids, params or SamplingParams(max_new_chars=0))
        return Generation(job, self.schedulers[model.id], model.id, session.id, len(ids), saved=saved)

    # -- scoring -----------------------------------------------------------------------------------

    async def score(
        self, texts: list[str], context: str | None = None, model_id: str | None = None, top_logprobs: int = 0
    ) -> tuple[str, list[PromptEvent]]:
        """Each text read teacher-forced after `context` (or after the line break a generation starts
        from): the model's log-probability of each of its characters, with the top alternatives when asked.

        Texts are stateless jobs that only read: the scheduler reads them in chunks of at most
        `prefill_chunk` positions, texts of the same chunk length in one seq=T call, between the steps
        of running streams. Every text is checked before any is read."""
        self._refuse_when_draining()
        model = self.registry.get(model_id)
        info = model.engine.info
        if top_logprobs > info.vocab_size:
            raise InvalidInput(
                f"top_logprobs is {top_logprobs}; model {model.id!r} has {info.vocab_size} characters",
                field="top_logprobs",
            )
        if context:
            start = self._prompt_ids(model, context, "context")
        elif DEFAULT_START in info.vocab_index:
            start = [info.vocab_index[DEFAULT_START]]
        else:
            raise InvalidInput("context is required: the model has no line break to start from", field="context")
        total = sum(len(text) for text in texts)
        if total > MAX_SCORE_CHARS:
            raise TooLarge(
                f"texts have {total} characters in all; one request may score at most {MAX_SCORE_CHARS}", field="texts"
            )
        each = [self._prompt_ids(model, text, f"texts.{i}") for i, text in enumerate(texts)]
        # Greedy: a job that only reads draws nothing, so it needs no seeded RNG of its own.
        params = SamplingParams(temperature=0.0, max_new_chars=0, prompt_logprobs=True, top_logprobs=top_logprobs)
        scheduler = self.schedulers[model.id]
        zero = list(self._new_session(model, None).state)  # each job's row is a copy of it
        readings: list[Generation] = []
        try:
            for ids in each:
                job = Job(start + ids, zero, None, params, _NO_DRAWS, wants_state=False)
                scheduler.submit(job)
                readings.append(Generation(job, scheduler, model.id, None, len(ids)))
            results = await asyncio.gather(*(r.result() for r in readings))
        except BaseException:
            for reading in readings:
                reading.cancel()
            raise
        scored = []
        for result in results:
            assert result.prompt is not None  # asked for: sent once the text is read
            read = result.prompt
            skip = len(start)
            scored.append(
                PromptEvent(
                    read.text[skip:],
                    logprobs=None if read.logprobs is None else read.logprobs[skip:],
                    top_logprobs=None if read.top_logprobs is None else read.top_logprobs[skip:],
                )
            )
        return model.id, scored

    # -- generation --------------------------------------------------------------------------------

    async def generate(
        self,
        params: SamplingParams,
        prompt: str = "",
        model_id: str | None = None,
        seed: int | None = None,
        session_id: str | None = None,
    ) -> Generation:
        """Validate, take the session (or make a throwaway one), and start the job."""
        self._refuse_when_draining()
        if session_id is None:
            model = self.registry.get(model_id)
            self._check_params(model, params, len(prompt))
            matcher = await self._matcher(model, params)
            session = self._new_session(model, seed)
            ids = self._start_ids(model, session, prompt)
            ids, keeper = await self._from_prompt_cache(model, session, ids, params)
            if self.registry.models.get(model.id) is not model:  # swapped while compiling or asking Redis
                return await self.generate(params, prompt, model_id, seed, session_id)
            job, saved = self._job(session, None, model, ids, params, matcher, on_chunk=keeper)
        else:
            async with self._leased(session_id) as (session, lease):
                if model_id is not None and model_id != session.model:
                    raise InvalidInput(
                        f"session {session_id!r} belongs to model {session.model!r}, not {model_id!r}",
                        field="model",
                    )
                model = self.registry.get(session.model)
                self._check_params(model, params, len(prompt))
                matcher = await self._matcher(model, params)
                if self.registry.models.get(model.id) is not model:  # swapped while the constraint compiled
                    raise model_swapped(session, self.registry.get(model.id).sha256)
                ids = self._start_ids(model, session, prompt)
                if seed is not None:
                    session.reseed(seed)
                # Inside the block: if starting the job raises, the lease is given back.
                job, saved = self._job(session, lease, model, ids, params, matcher)
        return Generation(
            job,
            self.schedulers[model.id],
            model.id,
            session_id,
            len(prompt),
            on_stream=spans.traced(self._track_stream, model.id, session_id),
            saved=saved,
        )

    def _start_ids(self, model: LoadedModel, session: Session, prompt: str) -> list[int]:
        ids = self._prompt_ids(model, prompt, "prompt")
        if not ids and session.logits is None:
            # Nothing to continue from: start where a text starts, at a line break.
            if DEFAULT_START not in model.engine.info.vocab_index:
                raise InvalidInput(
                    "prompt is required: the session has no history and the model has no line break",
                    field="prompt",
                )
            ids = [model.engine.info.vocab_index[DEFAULT_START]]
        return ids

    async def read_prompt_once(self, params: SamplingParams, prompt: str, model_id: str | None) -> None:
        """Before several stateless generations of one prompt start, read it once into the prompt-state
        cache, so that each of them starts from the state after it instead of reading it again.

        Does nothing when the cache would not serve them (a short prompt, annotations, penalties) or
        already holds the whole prompt. Their text is the same as without it.
        """
        self._refuse_when_draining()
        model = self.registry.get(model_id)
        self._check_params(model, params, len(prompt))
        session = self._new_session(model, None)
        start_ids = self._start_ids(model, session, prompt)
        ids, keeper = await self._from_prompt_cache(model, session, start_ids, params)
        if keeper is None or not ids or self.registry.models.get(model.id) is not model:
            return  # nothing to read, or the model was swapped meanwhile: each generation reads it itself
        job, _ = self._job(session, None, model, ids, SamplingParams(max_new_chars=0), on_chunk=keeper)
        reading = Generation(job, self.schedulers[model.id], model.id, None, len(ids))
        try:
            await reading.result()
        except BaseException:
            reading.cancel()
            raise

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
        chunk, cache = self.settings.prefill_chunk, self.prompt_cache
        if cache.max_bytes == 0 or len(ids) < chunk or params.annotates_prompt or params.penalised:
            return ids, None
        plan = cache.plan(model.sha256, ids, chunk)
        shared = self.shared_states
        if shared is not None and plan.digests:
            found = await shared.longest(plan.digests, model.engine.info)
            if found is not None:
                end, state = found
                cache.put(plan.digests[end], list(state.state), state.logits)
                plan = PrefixPlan(end, state, {p: d for p, d in plan.digests.items() if p > end})
                self.metrics.prompt_cache_shared_hits.labels(model.id).inc()
        self.metrics.prefix_cache_queries.labels(model.id).inc(len(ids))
        self.metrics.prefix_cache_hits.labels(model.id).inc(plan.start if plan.hit is not None else 0)
        if plan.hit is None:
            self.metrics.prompt_cache_misses.labels(model.id).inc()
        else:
            self.metrics.prompt_cache_hits.labels(model.id).inc()
            self.metrics.prompt_cache_chars.labels(model.id).inc(plan.start)
            session.state = list(plan.hit.state)  # the scheduler copies it into its slot table
            session.logits = plan.hit.logits
        return ids[plan.start :], cache.keeper(plan, shared, asyncio.get_running_loop())

    def _job(
        self,
        session: Session,
        lease: Lease | None,
        model: LoadedModel,
        ids: list[int],
        params: SamplingParams,
        matcher: CharMatcher | None = None,
        on_chunk: ChunkKeeper | None = None,
    ) -> tuple[Job, asyncio.Future[ApiError | None] | None]:
        """Submit the job; with a lease, its end writes the session back (the future says how that went)."""
        rng = session.rng()
        saved: asyncio.Future[ApiError | None] | None = None
        if lease is not None:
            saved = asyncio.get_running_loop().create_future()

        def on_complete(job: Job) -> None:
            # On the event loop, with the job's final event: write back, then end the lease.
            if lease is None or saved is None:
                return
            if job.phase is not Phase.FAILED:
                session.state = job.state
                session.logits = job.logits
                session.history_chars += job.absorbed
                session.rng_state = rng_state_of(rng.bit_generator)
            self._in_background(self._write_back(session, lease, job.phase is not Phase.FAILED, saved))

        job = Job(
            prompt=ids,
            state=list(session.state),
            logits=session.logits,
            params=params,
            rng=rng,
            wants_state=lease is not None,
            on_complete=on_complete,
            on_chunk=on_chunk,
            matcher=matcher,
            events=Mailbox(self.settings.stream_interval),
        )
        self.schedulers[model.id].submit(job)
        return job, saved

    async def _write_back(
        self, session: Session, lease: Lease, save: bool, saved: asyncio.Future[ApiError | None]
    ) -> None:
        """Save the session's new state and end its lease; never raises (the outcome goes to `saved`)."""
        outcome: ApiError | None = None
        try:
            if save:
                await self._save(session, lease)
            else:
                await self.store.release(lease)
        except ApiError as exc:
            outcome = exc
            log.error("session not saved", extra={"session": session.id, "error": exc.message})
        except Exception:
            log.exception("session not saved", extra={"session": session.id})
            outcome = InternalError("the session's new state could not be saved")
        if not saved.done():
            saved.set_result(outcome)

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- upkeep ------------------------------------------------------------------------------------

    async def evict_expired(self) -> int:
        n = await self.store.evict_expired()
        if n:
            self.metrics.evicted.inc(n)
            log.info("sessions expired", extra={"count": n})
        return n

    async def refresh_metrics(self) -> None:
        stats = await self.store.stats()
        self.metrics.active_sessions.set(stats.sessions)
        self.metrics.busy_sessions.set(stats.busy)
        self.metrics.session_state_bytes.set(stats.state_bytes)
        self.metrics.session_memory_bytes.set(stats.approx_bytes)
        self.metrics.prompt_cache_bytes.set(self.prompt_cache.bytes)
        for name, scheduler in self.schedulers.items():
            self.metrics.active_generations.labels(name).set(scheduler.active)

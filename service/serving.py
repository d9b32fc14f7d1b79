"""The serving logic between the routes (HTTP only) and the schedulers (onnxruntime).

Everything a request can get wrong is checked here, before a stream starts, so a bad request
is an HTTP error and never a broken stream. Buildable in one line from a registry:
`GenerationService.create(registry, settings)`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from service.errors import InvalidInput, ModelUnavailable, TooLarge
from service.metrics import Metrics
from service.registry import LoadedModel, ModelRegistry
from service.sampling import SamplingParams
from service.scheduler import DoneEvent, ErrorEvent, Event, Job, Scheduler, TextEvent
from service.schemas import SessionInfo
from service.sessions import InMemorySessionStore, Session, SessionStore
from service.settings import Settings

log = logging.getLogger("charstream.serving")

# What a session with no history reads first when the request brings no prompt.
DEFAULT_START = "\n"


@dataclass
class GenerationResult:
    text: str
    finish_reason: str
    generated_chars: int
    logprobs: list[float] | None


class Generation:
    """A running generation: iterate its events; leaving the iteration early cancels it."""

    def __init__(self, job: Job, scheduler: Scheduler, model: str, session_id: str | None, prompt_chars: int) -> None:
        self.job = job
        self.scheduler = scheduler
        self.model = model
        self.session_id = session_id
        self.prompt_chars = prompt_chars

    async def events(self) -> AsyncIterator[Event]:
        """Text events, merged when several are waiting, then one DoneEvent or ErrorEvent."""
        try:
            while True:
                texts: list[str] = []
                logprobs: list[float] | None = None
                final: Event | None = None
                for event in await self.job.events.take():
                    if isinstance(event, TextEvent):
                        texts.append(event.text)
                        if event.logprobs is not None:
                            logprobs = event.logprobs if logprobs is None else logprobs + event.logprobs
                    else:
                        final = event
                if texts:
                    yield TextEvent("".join(texts), logprobs)
                if final is not None:
                    yield final
                    return
        finally:
            # A client gone (disconnect, cancelled task) stops the job at the next step.
            self.scheduler.cancel(self.job)

    def cancel(self) -> None:
        self.scheduler.cancel(self.job)

    async def collect(self) -> GenerationResult | ErrorEvent:
        texts: list[str] = []
        logprobs: list[float] | None = [] if self.job.params.logprobs else None
        async for event in self.events():
            if isinstance(event, TextEvent):
                texts.append(event.text)
                if logprobs is not None and event.logprobs:
                    logprobs.extend(event.logprobs)
            elif isinstance(event, DoneEvent):
                return GenerationResult("".join(texts), event.finish_reason, event.generated_chars, logprobs)
            else:
                return event
        raise RuntimeError("generation ended without a final event")


class GenerationService:
    def __init__(
        self,
        registry: ModelRegistry,
        store: SessionStore,
        schedulers: dict[str, Scheduler],
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self.registry = registry
        self.store = store
        self.schedulers = schedulers
        self.settings = settings
        self.metrics = metrics
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def create(cls, registry: ModelRegistry, settings: Settings, metrics: Metrics | None = None) -> GenerationService:
        metrics = metrics or Metrics()
        schedulers = {
            name: Scheduler(
                name,
                model.engine,
                metrics,
                max_batch_size=settings.max_batch_size,
                max_wait_us=settings.max_wait_us,
                batching=settings.batching,
            )
            for name, model in registry.models.items()
        }
        store = InMemorySessionStore(settings.session_ttl_s, settings.max_sessions)
        return cls(registry, store, schedulers, settings, metrics)

    def start(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()

    async def stop(self) -> None:
        for scheduler in self.schedulers.values():
            await scheduler.stop()
        for task in list(self._background):
            await task

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

    def _check_params(self, params: SamplingParams) -> None:
        if params.max_new_chars > self.settings.max_new_chars:
            raise InvalidInput(
                f"max_new_chars is {params.max_new_chars}; the limit is {self.settings.max_new_chars}",
                field="max_new_chars",
            )

    def info(self, session: Session) -> SessionInfo:
        return SessionInfo(
            id=session.id,
            model=session.model,
            seed=session.seed,
            history_chars=session.history_chars,
            created_at=session.created_at,
            expires_at=self.store.expires_at(session),
            state_bytes=session.state_bytes,
        )

    # -- sessions ----------------------------------------------------------------------------------

    def _new_session(self, model: LoadedModel, seed: int | None) -> Session:
        info = model.engine.info
        return Session.fresh(model.id, info.state_shape_per_row, len(info.state_names), seed)

    async def create_session(self, model_id: str | None, prompt: str, seed: int | None) -> SessionInfo:
        model = self.registry.get(model_id)
        ids = self._prompt_ids(model, prompt, "prompt")
        session = self._new_session(model, seed)
        await self.store.add(session)
        if ids:
            await self.store.acquire(session.id)
            await self._run_feed(session, model, ids)
        return self.info(session)

    async def get_session(self, session_id: str) -> SessionInfo:
        return self.info(await self.store.get(session_id))

    async def delete_session(self, session_id: str) -> None:
        await self.store.acquire(session_id)  # 409 while a request runs on it
        await self.store.delete(session_id)

    async def reset_session(self, session_id: str) -> SessionInfo:
        session = await self.store.acquire(session_id)
        try:
            session.reset()
        finally:
            await self.store.release(session)
        return self.info(session)

    async def fork_session(self, session_id: str, seed: int | None) -> SessionInfo:
        session = await self.store.acquire(session_id)
        try:
            child = session.fork(seed)
        finally:
            await self.store.release(session)
        await self.store.add(child)
        return self.info(child)

    async def feed(self, session_id: str, text: str) -> tuple[SessionInfo, int]:
        session = await self.store.acquire(session_id)
        try:
            model = self.registry.get(session.model)
            ids = self._prompt_ids(model, text, "text")
        except BaseException:
            await self.store.release(session)
            raise
        await self._run_feed(session, model, ids)
        return self.info(session), len(ids)

    async def _run_feed(self, session: Session, model: LoadedModel, ids: list[int]) -> None:
        """Read `ids` into a session already acquired; releases it."""
        job = self._job(session, model, ids, SamplingParams(max_new_chars=0), stored=True)
        generation = Generation(job, self.schedulers[model.id], model.id, session.id, len(ids))
        result = await generation.collect()
        if isinstance(result, ErrorEvent):
            raise ModelUnavailable(f"the model could not read the text: {result.message}")

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
        self._check_params(params)
        if session_id is not None:
            session = await self.store.acquire(session_id)
            try:
                if model_id is not None and model_id != session.model:
                    raise InvalidInput(
                        f"session {session_id!r} belongs to model {session.model!r}, not {model_id!r}",
                        field="model",
                    )
                model = self.registry.get(session.model)
                ids = self._start_ids(model, session, prompt)
                if seed is not None:
                    session.seed = seed
                    session.rng = np.random.default_rng(seed)
            except BaseException:
                await self.store.release(session)
                raise
            stored = True
        else:
            model = self.registry.get(model_id)
            session = self._new_session(model, seed)
            ids = self._start_ids(model, session, prompt)
            stored = False
        job = self._job(session, model, ids, params, stored)
        return Generation(job, self.schedulers[model.id], model.id, session.id if stored else None, len(prompt))

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

    def _job(
        self,
        session: Session,
        model: LoadedModel,
        ids: list[int],
        params: SamplingParams,
        stored: bool,
    ) -> Job:
        def on_complete(job: Job) -> None:
            if not job.failed:
                session.state = job.state
                session.logits = job.logits
                session.history_chars += job.absorbed
            else:
                self.metrics.errors.labels("engine_error").inc()
            if stored:
                task = asyncio.get_running_loop().create_task(self.store.release(session))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

        job = Job(
            prime=ids,
            state=list(session.state),
            logits=session.logits,
            params=params,
            rng=session.rng,
            keep_state=stored,
            on_complete=on_complete,
        )
        self.schedulers[model.id].submit(job)
        return job

    # -- upkeep ------------------------------------------------------------------------------------

    async def evict_expired(self) -> int:
        n = await self.store.evict_expired()
        if n:
            self.metrics.evicted.inc(n)
            log.info("sessions expired", extra={"count": n})
        return n

    def refresh_metrics(self) -> None:
        stats = self.store.stats()
        self.metrics.active_sessions.set(stats.sessions)
        self.metrics.busy_sessions.set(stats.busy)
        self.metrics.session_state_bytes.set(stats.state_bytes)
        self.metrics.session_memory_bytes.set(stats.approx_bytes)
        for name, scheduler in self.schedulers.items():
            self.metrics.active_generations.labels(name).set(scheduler.active)

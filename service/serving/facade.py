"""The generation service: the serving logic between the routes (HTTP only) and the schedulers.

`GenerationService` is a facade: it routes each call to the module that does that job, and holds
nothing of its own but what they share (`Resources`).

- generate.py: generations, stateless and on a session, and reading a prompt once for several
- score.py: texts read teacher-forced, with their characters' log-probabilities
- session_ops.py: a session's own routes (create, get, delete, reset, fork, feed)
- lifecycle.py: start, drain, stop, the schedulers for swapped-in versions, upkeep
- checks.py, compiles.py, leases.py: what those share (request checks, constraint compiles,
  session leases and the jobs that write a session back)

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

from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from service.core.engine import Engine
from service.core.events import PromptEvent
from service.core.generation import Generation
from service.core.sampling import SamplingParams
from service.core.scheduler import Scheduler
from service.metrics import Metrics
from service.serving.compiles import ConstraintCompiles
from service.serving.embed import Embeddings
from service.serving.generate import Generations
from service.serving.lifecycle import Lifecycle, new_scheduler
from service.serving.prompt_cache import PromptCache, SharedStates
from service.serving.registry import ModelRegistry
from service.serving.resources import Resources
from service.serving.score import Scoring
from service.serving.session_ops import SessionOps
from service.serving.states import States
from service.sessions import open_store
from service.sessions.store import ANYONE, Owner, Session, SessionStore
from service.settings import Settings


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
        cache = prompt_cache or PromptCache(settings.prompt_cache_bytes)
        self.resources = res = Resources(registry, store, schedulers, settings, metrics, cache, shared_states)
        compiles = ConstraintCompiles(res)
        self.compiles = compiles
        self.generations = Generations(res, compiles)
        self.scoring = Scoring(res)
        self.sessions = SessionOps(res)
        self.lifecycle = Lifecycle(res, compiles)
        self.states = States(res)
        self.embeddings = Embeddings(res)

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
            prefix=settings.redis_prefix,
        )
        shared = None
        if settings.prompt_cache_shared:
            from service.sessions.redis_store import RedisSessionStore

            assert isinstance(store, RedisSessionStore)  # the settings refuse a shared cache without Redis
            shared = SharedStates(store.client, settings.session_ttl_s, f"{settings.redis_prefix}:prompt:")
        return cls(registry, store, schedulers, settings, metrics, shared_states=shared)

    # -- what the routes, the swapper and the ops routes read ---------------------------------------

    @property
    def registry(self) -> ModelRegistry:
        return self.resources.registry

    @property
    def store(self) -> SessionStore:
        return self.resources.store

    @property
    def schedulers(self) -> dict[str, Scheduler]:
        return self.resources.schedulers

    @property
    def settings(self) -> Settings:
        return self.resources.settings

    @property
    def metrics(self) -> Metrics:
        return self.resources.metrics

    @property
    def prompt_cache(self) -> PromptCache:
        return self.resources.prompt_cache

    @property
    def draining(self) -> bool:
        return self.resources.draining

    @property
    def retired(self) -> set[Scheduler]:
        """Schedulers of versions replaced by a model swap, finishing the generations they hold."""
        return self.resources.retired

    @property
    def connection_closers(self) -> set[Callable[[], Awaitable[None]]]:
        """Called at the end of a drain: the open WebSocket connections close themselves (1001)."""
        return self.resources.connection_closers

    @property
    def running(self) -> int:
        return self.lifecycle.running

    # -- lifecycle.py ------------------------------------------------------------------------------

    def new_scheduler(self, name: str, engine: Engine) -> Scheduler:
        return self.lifecycle.new_scheduler(name, engine)

    def start(self) -> None:
        self.lifecycle.start()

    async def stop(self) -> None:
        await self.lifecycle.stop()

    async def drain(self, grace_s: float) -> None:
        await self.lifecycle.drain(grace_s)

    async def evict_expired(self) -> int:
        return await self.lifecycle.evict_expired()

    async def refresh_metrics(self) -> None:
        await self.lifecycle.refresh_metrics()

    # -- generate.py and compiles.py ---------------------------------------------------------------

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
        """`group` names the request a generation is one of: a request runs at most
        CHARSTREAM_MAX_ROWS_PER_REQUEST of its generations at once."""
        return await self.generations.generate(params, prompt, model_id, seed, session_id, owner, start, keep, group)

    async def read_prompt_once(self, params: SamplingParams, prompt: str, model_id: str | None) -> None:
        await self.generations.read_prompt_once(params, prompt, model_id)

    async def check_constraint_rows(self, params: SamplingParams, model_id: str, rows: int, field: str) -> None:
        await self.compiles.check_rows(params, model_id, rows, field)

    # -- embed.py ----------------------------------------------------------------------------------

    async def embed(
        self, texts: list[str], model_id: str | None, dimensions: int | None = None
    ) -> tuple[str, list[np.ndarray]]:
        return await self.embeddings.embed(texts, model_id, dimensions)

    # -- states.py ---------------------------------------------------------------------------------

    def export_state(self, session: Session, metadata: dict[str, Any] | None = None) -> bytes:
        return self.states.export(session, metadata)

    def state_session(
        self, blob: bytes | None, model_id: str | None, seed: int | None, owner: Owner = ANYONE
    ) -> Session:
        return self.states.start(blob, model_id, seed, owner)

    async def get_session_state(self, session_id: str, owner: Owner) -> bytes:
        return self.export_state(await self.sessions.get(session_id, owner))

    # -- score.py ----------------------------------------------------------------------------------

    async def score(
        self, texts: list[str], context: str | None = None, model_id: str | None = None, top_logprobs: int = 0
    ) -> tuple[str, list[PromptEvent]]:
        return await self.scoring.score(texts, context, model_id, top_logprobs)

    # -- session_ops.py ----------------------------------------------------------------------------

    # A session is its owner's: another key's request finds nothing (404). On a server without keys
    # every caller is ANYONE.

    async def create_session(
        self, model_id: str | None, prompt: str, seed: int | None, owner: Owner, state: bytes | None = None
    ) -> Session:
        """A new session, fresh or holding the state in `state` (409 unless it fits a served model)."""
        start = None if state is None else self.states.session_of(state, model_id, owner)[1]
        return await self.sessions.create(model_id, prompt, seed, owner, start)

    async def get_session(self, session_id: str, owner: Owner) -> Session:
        return await self.sessions.get(session_id, owner)

    async def delete_session(self, session_id: str, owner: Owner) -> None:
        await self.sessions.delete(session_id, owner)

    async def reset_session(self, session_id: str, owner: Owner) -> Session:
        return await self.sessions.reset(session_id, owner)

    async def fork_session(self, session_id: str, seed: int | None, owner: Owner) -> Session:
        return await self.sessions.fork(session_id, seed, owner)

    async def feed(self, session_id: str, text: str, owner: Owner) -> tuple[Session, int]:
        return await self.sessions.feed(session_id, text, owner)

    async def feed_scored(
        self, session_id: str, text: str, params: SamplingParams, owner: Owner
    ) -> tuple[Session, int, PromptEvent | None]:
        return await self.sessions.feed_scored(session_id, text, params, owner)

"""What every part of the serving logic shares: the models and their schedulers, the session store,
the prompt-state cache, the settings and metrics, and the service's own bookkeeping (the drain, the
write-backs running in the background, the streams being sent, the schedulers of swapped-out versions).

One `Resources` is built by the facade and handed to each part; none of them owns it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from service.core.generation import Generation
from service.core.scheduler import Scheduler
from service.errors import ShuttingDown
from service.metrics import Metrics
from service.serving.prompt_cache import PromptCache, SharedStates
from service.serving.registry import LoadedModel, ModelRegistry
from service.sessions.store import SessionStore
from service.settings import Settings


@dataclass
class Resources:
    registry: ModelRegistry
    store: SessionStore
    schedulers: dict[str, Scheduler]
    settings: Settings
    metrics: Metrics
    # States after prompt prefixes, for stateless requests (bounded by CHARSTREAM_PROMPT_CACHE_BYTES).
    prompt_cache: PromptCache
    shared_states: SharedStates | None = None  # with CHARSTREAM_PROMPT_CACHE_SHARED: the states in Redis too
    draining: bool = False
    # Schedulers of versions replaced by a model swap, finishing the generations they hold.
    retired: set[Scheduler] = field(default_factory=set)
    # Called at the end of a drain: the open WebSocket connections close themselves (1001).
    connection_closers: set[Callable[[], Awaitable[None]]] = field(default_factory=set)
    streams: set[Generation] = field(default_factory=set)  # streams being sent right now
    background: set[asyncio.Task[None]] = field(default_factory=set)

    def refuse_when_draining(self) -> None:
        if self.draining:
            raise ShuttingDown()

    def serves(self, model: LoadedModel) -> bool:
        """Whether `model` is still the version serving its id (a swap may replace it during any await)."""
        return self.registry.models.get(model.id) is model

    def track_stream(self, generation: Generation, open_: bool) -> None:
        if open_:
            self.streams.add(generation)
        else:
            self.streams.discard(generation)

    def in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

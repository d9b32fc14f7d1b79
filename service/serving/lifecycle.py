"""The service's life and its models': start, graceful drain, stop; a scheduler for each model and
for each new version a swap brings in (swaps.py decides when, `retired` holds the replaced ones until
they finish); and the upkeep the app runs on a timer (expired sessions, gauges).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from service.core.engine import Engine
from service.core.scheduler import Scheduler
from service.metrics import Metrics
from service.serving.compiles import ConstraintCompiles
from service.serving.resources import Resources
from service.settings import Settings

log = logging.getLogger("charstream.serving")

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
        prefill_share=settings.prefill_share,
        max_rows_per_request=settings.max_rows_per_request,
    )


class Lifecycle:
    def __init__(self, res: Resources, compiles: ConstraintCompiles) -> None:
        self.res = res
        self.compiles = compiles

    def new_scheduler(self, name: str, engine: Engine) -> Scheduler:
        """A scheduler for another version of a model (a swap), set up as the others."""
        return new_scheduler(name, engine, self.res.settings, self.res.metrics)

    def start(self) -> None:
        sys.setswitchinterval(self.res.settings.switch_interval_us / 1e6)
        for scheduler in self.res.schedulers.values():
            scheduler.start()

    async def stop(self) -> None:
        for scheduler in self.res.schedulers.values():
            await scheduler.stop()
        for task in list(self.res.background):
            await task
        await self.res.store.close()
        self.compiles.close()

    @property
    def running(self) -> int:
        """Generations and feeds not yet finished, over every model (and version being retired)."""
        return sum(s.active for s in [*self.res.schedulers.values(), *self.res.retired])

    async def drain(self, grace_s: float) -> None:
        """Graceful shutdown: refuse new work, let running generations finish for up to `grace_s`,
        end the rest with a `shutting_down` error, and give streams time to send their last frame."""
        res = self.res
        res.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.running and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.running:
            log.warning("ending generations still running at shutdown", extra={"count": self.running})
            for scheduler in [*res.schedulers.values(), *res.retired]:
                scheduler.abort_all("shutting_down", "the server is shutting down; retry the request")
        deadline = loop.time() + FINAL_FRAMES_WAIT_S
        while (self.running or res.streams) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.gather(*(close() for close in list(res.connection_closers)), return_exceptions=True)
        for task in list(res.background):
            await task

    async def evict_expired(self) -> int:
        n = await self.res.store.evict_expired()
        if n:
            self.res.metrics.evicted.inc(n)
            log.info("sessions expired", extra={"count": n})
        return n

    async def refresh_metrics(self) -> None:
        res = self.res
        stats = await res.store.stats()
        res.metrics.active_sessions.set(stats.sessions)
        res.metrics.busy_sessions.set(stats.busy)
        res.metrics.session_state_bytes.set(stats.state_bytes)
        res.metrics.session_memory_bytes.set(stats.approx_bytes)
        res.metrics.prompt_cache_bytes.set(res.prompt_cache.bytes)
        for name, scheduler in res.schedulers.items():
            res.metrics.active_generations.labels(name).set(scheduler.active)

"""Models swapped without a restart: a new version of a model's folder is loaded beside the one
serving, new requests go to it, and running ones finish on the version they started on.

How a swap goes (`ModelSwapper.reload`, one at a time):

1. Load the folder again, off the event loop, into a new engine. If that fails, the old version
   keeps serving and the reason is kept for /readyz (`registry.swap_failures`) and logged.
2. The same file (sha256) as the one serving: nothing changes.
3. Otherwise a new scheduler starts for the new engine, and in one step of the event loop the
   registry, the service's schedulers and the session store's versions switch to it. A
   generation already running holds its scheduler and finishes there; the old scheduler stops
   once it holds nothing (until then a drain waits for it too: `service.retired`).
4. A session made with the old file is refused from then on with 409 `session_model_mismatch`
   (the store checks each session's version), never read into the new weights; a generation
   running on it during the swap still saves its state, which is refused on the next request.

A swap starts from the admin route (POST /v1/admin/models/{id}/reload) or from `poll_forever`,
which notices that a model's file changed (an export renames a new folder into place). The poll
also loads a model folder that appears (`add`), or one that failed and whose file changed since.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service.core.scheduler import Scheduler
from service.errors import NotFound
from service.serving.registry import VARIANT_FILES, ModelLoadError, load_folder, stamp

if TYPE_CHECKING:
    from service.serving.facade import GenerationService

log = logging.getLogger("charstream.swaps")

RETIRE_POLL_S = 0.05  # how often a retired scheduler is checked for running generations


@dataclass(frozen=True)
class SwapResult:
    model: str
    swapped: bool
    version: str  # sha256 of the file serving after the call
    previous: str
    error: str | None = None  # why the new version did not load (the previous one still serves)


class ModelSwapper:
    def __init__(self, service: GenerationService) -> None:
        self.service = service
        self._lock = asyncio.Lock()
        self._retiring: dict[asyncio.Task[None], Scheduler] = {}

    async def reload(self, model_id: str) -> SwapResult:
        """Load `model_id`'s folder again and serve it if its file changed."""
        async with self._lock:
            registry = self.service.registry
            current = registry.models.get(model_id)
            if current is None:
                raise NotFound(f"model {model_id!r} is not loaded; GET /v1/models lists them", field="model_id")
            try:
                new = await asyncio.get_running_loop().run_in_executor(None, registry.reload, model_id)
            except ModelLoadError as exc:
                registry.swap_failures[model_id] = f"the new version did not load, the previous one serves: {exc}"
                current.stamp = stamp(registry.file_of(current))  # tried once per change of the file
                log.error("model swap failed", extra={"model": model_id, "reason": str(exc)})
                return SwapResult(model_id, False, current.sha256, current.sha256, str(exc))
            registry.swap_failures.pop(model_id, None)
            if new.sha256 == current.sha256:
                current.stamp = new.stamp
                return SwapResult(model_id, False, current.sha256, current.sha256)
            scheduler = self.service.new_scheduler(model_id, new.engine)
            scheduler.start()
            old = self.service.schedulers[model_id]
            # One step of the event loop: no request sees half of the switch.
            registry.models[model_id] = new
            self.service.schedulers[model_id] = scheduler
            self.service.store.models[model_id] = new.sha256
            self.service.retired.add(old)
            task = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring[task] = old
            task.add_done_callback(lambda done: self._retiring.pop(done, None))
            log.info(
                "model swapped",
                extra={"model": model_id, "version": new.sha256[:12], "previous": current.sha256[:12]},
            )
            return SwapResult(model_id, True, new.sha256, current.sha256)

    async def add(self, folder: Path) -> None:
        """Load a model folder that is not served yet; a failure is listed in /readyz's `failed`."""
        async with self._lock:
            registry, name = self.service.registry, folder.name
            registry.tried[name] = stamp(folder / VARIANT_FILES[registry.variant])
            loop = asyncio.get_running_loop()
            try:
                new = await loop.run_in_executor(None, load_folder, folder, registry.variant, registry.threads)
            except ModelLoadError as exc:
                registry.failures[name] = str(exc)
                log.error("model failed to load", extra={"model": name, "reason": str(exc)})
                return
            scheduler = self.service.new_scheduler(name, new.engine)
            scheduler.start()
            self.service.schedulers[name] = scheduler
            self.service.store.models[name] = new.sha256
            registry.models[name] = new  # last: a request finds the model once it can run
            registry.failures.pop(name, None)
            registry.failures.pop("*", None)  # "no model folders" no longer holds
            if registry.default is None:
                registry.default = name
            log.info("model added", extra={"model": name, "version": new.sha256[:12]})

    async def _retire(self, scheduler: Scheduler) -> None:
        """Stop a replaced scheduler once the generations it holds have ended."""
        while scheduler.active:
            await asyncio.sleep(RETIRE_POLL_S)
        await scheduler.stop()
        self.service.retired.discard(scheduler)

    async def poll_forever(self, interval_s: float) -> None:
        """Every `interval_s`, swap each model whose file changed since it was loaded."""
        while True:
            await asyncio.sleep(interval_s)
            registry = self.service.registry
            for model_id, model in list(registry.models.items()):
                now = stamp(registry.file_of(model))
                if now is not None and now != model.stamp:
                    try:
                        await self.reload(model_id)
                    except Exception:  # the poller keeps going; the next change tries again
                        log.exception("model swap failed", extra={"model": model_id})
            for folder in registry.new_folders():
                try:
                    await self.add(folder)
                except Exception:
                    log.exception("model failed to load", extra={"model": folder.name})

    async def close(self) -> None:
        """At shutdown: end what retired schedulers still hold (a `shutting_down` error, as a drain does)."""
        for task, scheduler in list(self._retiring.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await scheduler.stop()
            self.service.retired.discard(scheduler)

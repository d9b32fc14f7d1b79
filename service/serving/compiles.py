"""Constraints compiled for requests: on threads of their own, shared by every request asking for
the same one (the model's compiler caches them), waited for at most COMPILE_TIMEOUT_S, and refused
with a 422 naming the field before any step.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from service.core.constraints import CharMatcher, Compiled, ConstraintError
from service.core.sampling import SamplingParams
from service.errors import InvalidInput
from service.serving.registry import LoadedModel
from service.serving.resources import Resources

# How long a request waits for its constraint to compile (llguidance's own limits bound the work).
COMPILE_TIMEOUT_S = 5.0
# Constraints compile on threads of their own: a burst of costly ones waits for these rather than
# taking the default executor (session stores, file reads) or every core.
COMPILE_THREADS = 2


class ConstraintCompiles:
    def __init__(self, res: Resources) -> None:
        self.res = res
        self._threads = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="constraints")

    async def matcher(self, model: LoadedModel, params: SamplingParams) -> CharMatcher | None:
        """The job's compiled constraint (cached per model), or a 422 naming the field, before any step."""
        if params.constraint is None:
            return None
        return (await self._compiled(model, params)).new()

    async def check_rows(self, params: SamplingParams, model_id: str, rows: int, field: str) -> None:
        """Refuse (naming `field`) a request that would run its constraint on `rows` rows at once when their
        masks together would add more than the step budget to every step of the model's streams."""
        if params.constraint is None or rows <= 1:
            return
        model = self.res.registry.get(model_id)
        at_once = min(rows, self.res.schedulers[model.id].max_batch_size)
        try:
            (await self._compiled(model, params)).check_rows(at_once)
        except ConstraintError as exc:
            raise InvalidInput(
                f"{params.constraint.field} cannot run on {rows} choices at once with model {model.id!r}: {exc}",
                field=field,
            ) from exc

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _compiled(self, model: LoadedModel, params: SamplingParams) -> Compiled:
        """Compiled on the compile threads, and waited for at most COMPILE_TIMEOUT_S (the probe ends a
        costly compile soon after; its verdict is cached, and a retry joins the compile in flight)."""
        spec = params.constraint
        assert spec is not None
        compiler = self.res.schedulers[model.id].constraints
        try:
            compiling = asyncio.wrap_future(compiler.submit(spec, self._threads))
            # Shielded: the compile is shared by every request asking for it, and kept if this one gives up.
            return await asyncio.wait_for(asyncio.shield(compiling), COMPILE_TIMEOUT_S)
        except ConstraintError as exc:
            raise InvalidInput(f"{spec.field} cannot be used with model {model.id!r}: {exc}", field=spec.field) from exc
        except TimeoutError as exc:
            raise InvalidInput(
                f"{spec.field} took longer than {COMPILE_TIMEOUT_S:.0f} s to compile: simplify it", field=spec.field
            ) from exc

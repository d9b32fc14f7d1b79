"""A running generation as the routes see it: transport-neutral events, or one collected result."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from service.core.events import (
    Completed,
    DoneEvent,
    ErrorEvent,
    Failed,
    PromptEvent,
    StreamEvent,
    TextEvent,
    TopLogprobs,
)
from service.core.jobs import Job
from service.core.scheduler import Scheduler
from service.errors import ApiError, failure


@dataclass
class GenerationResult:
    text: str
    completed: Completed
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    activations: list[list[float]] | None = None
    prompt: PromptEvent | None = None


def merge_text(events: list[TextEvent]) -> TextEvent:
    """Several text events as one (a stream that fell behind sends what waits as one frame)."""
    if len(events) == 1:
        return events[0]
    first = events[0]
    merged = TextEvent("".join(e.text for e in events))
    if first.logprobs is not None:
        merged.logprobs = [x for e in events for x in e.logprobs or ()]
    if first.top_logprobs is not None:
        merged.top_logprobs = [x for e in events for x in e.top_logprobs or ()]
    if first.activations is not None:
        merged.activations = [x for e in events for x in e.activations or ()]
    return merged


class Generation:
    """Iterate `stream()` once, or await `result()`; leaving the stream early cancels the job."""

    def __init__(
        self,
        job: Job,
        scheduler: Scheduler,
        model: str,
        session_id: str | None,
        prompt_chars: int,
        on_stream: Callable[[Generation, bool], None] | None = None,
        saved: asyncio.Future[ApiError | None] | None = None,
    ) -> None:
        self.job = job
        # For a session: resolves once its new state is written back and its lease ended (None),
        # or with the error that prevented it. The final event waits for it, so a client that has
        # seen `done` can continue the session anywhere at once.
        self.saved = saved
        self.scheduler = scheduler
        self.model = model
        self.session_id = session_id
        self.prompt_chars = prompt_chars
        self._on_stream = on_stream  # told when a stream opens (True) and ends (False)
        self.first_char_at = 0.0  # perf_counter() when the first characters were handed on

    def _final(self, event: DoneEvent | ErrorEvent) -> Completed | Failed:
        if isinstance(event, DoneEvent):
            return Completed(event.finish_reason, self.prompt_chars, event.generated_chars, self.model, self.session_id)
        return Failed(failure(event.code, event.message, event.field))

    async def stream(self) -> AsyncGenerator[StreamEvent, None]:
        """Text (merged when several wait), the prompt's annotations if asked, then Completed or Failed."""
        if self._on_stream is not None:
            self._on_stream(self, True)
        timing, submitted = self.scheduler.request_metrics, self.job.submitted_at
        last: float | None = None  # when the last characters were handed on
        try:
            while True:
                texts: list[TextEvent] = []
                final: Completed | Failed | None = None
                for event in await self.job.events.take():
                    if isinstance(event, TextEvent):
                        texts.append(event)
                    elif isinstance(event, PromptEvent):
                        yield event
                    else:
                        final = self._final(event)
                if texts:
                    merged = merge_text(texts)
                    if merged.text:
                        last = timing.chars(submitted, last, len(merged.text))
                        self.first_char_at = self.first_char_at or last
                    yield merged
                if final is not None:
                    if self.saved is not None:
                        not_saved = await asyncio.shield(self.saved)
                        if not_saved is not None and isinstance(final, Completed):
                            final = Failed(not_saved)
                    timing.finished(submitted, self.job.admitted_at)
                    yield final
                    return
        finally:
            # A client gone (disconnect, cancelled task) stops the job at the next step.
            self.scheduler.cancel(self.job)
            if self._on_stream is not None:
                self._on_stream(self, False)

    def cancel(self) -> None:
        self.scheduler.cancel(self.job)

    async def result(self) -> GenerationResult:
        """The whole generation; raises the ApiError a failed one ended with."""
        texts: list[TextEvent] = []
        prompt: PromptEvent | None = None
        # Closed before returning: the stream's end (its hooks included) runs now, not when collected.
        async with contextlib.aclosing(self.stream()) as events:
            async for event in events:
                if isinstance(event, TextEvent):
                    texts.append(event)
                elif isinstance(event, PromptEvent):
                    prompt = event
                elif isinstance(event, Failed):
                    raise event.error
                else:
                    whole = merge_text(texts) if texts else TextEvent("")
                    params = self.job.params
                    return GenerationResult(
                        whole.text,
                        event,
                        logprobs=(whole.logprobs or []) if params.logprobs else None,
                        top_logprobs=(whole.top_logprobs or []) if params.top_logprobs else None,
                        activations=(whole.activations or []) if params.activations is not None else None,
                        prompt=prompt,
                    )
        raise ApiError("the generation ended without a final event")  # unreachable: every job gets one

"""What a generation adds to its request's trace span: the model, whether it ran on a session (never
the session's id, which is its bearer's credential to the state), and the
scheduler's phases as events at the times they happened (submitted to the scheduler, taken by it,
first character handed on, final event). OpenTelemetry's API only: a no-op unless tracing is on
(service/api/tracing.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry import trace

from service.core.generation import Generation

StreamHook = Callable[[Generation, bool], None]


def traced(on_stream: StreamHook, model: str, session_id: str | None) -> StreamHook:
    """`on_stream`, also recording the generation on the current request's span when it ends."""
    span = trace.get_current_span()
    if not span.is_recording():
        return on_stream
    span.set_attribute("charstream.model", model)
    span.set_attribute("charstream.session", session_id is not None)

    def hook(generation: Generation, open_: bool) -> None:
        on_stream(generation, open_)
        if not open_:
            _phases(span, generation)

    return hook


def _phases(span: trace.Span, generation: Generation) -> None:
    job = generation.job
    now_ns, now = time.time_ns(), time.perf_counter()

    def at(t: float) -> int:  # a perf_counter() reading as wall-clock nanoseconds
        return now_ns - int((now - t) * 1e9)

    if job.submitted_at:
        span.add_event("charstream.submitted", {"prompt_chars": len(job.prompt)}, timestamp=at(job.submitted_at))
    if job.admitted_at:
        span.add_event("charstream.admitted", timestamp=at(job.admitted_at))
    if generation.first_char_at:
        span.add_event("charstream.first_char", timestamp=at(generation.first_char_at))
    span.add_event(
        "charstream.finished",
        {"phase": job.phase.name.lower(), "generated_chars": job.generated},
        timestamp=now_ns,
    )

"""What a generation produces, in transport-neutral form: the routes only frame these.

The scheduler makes `TextEvent`, `PromptEvent`, `DoneEvent` and `ErrorEvent`; the serving layer
passes text through and turns the two final events into `Completed` or `Failed`, which carry
everything a final frame needs (usage, model, session, or the error body). Each event has one
`payload()`: the JSON object shared by the SSE frame, the WebSocket message (plus its `type`)
and the JSON answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.errors import ApiError

TopLogprobs = dict[str, float]  # character -> the model's natural-log probability


@dataclass(slots=True)
class TextEvent:
    """Generated text, with one entry per character in each annotation that was asked for."""

    text: str
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    activations: list[list[float]] | None = None

    @property
    def plain(self) -> bool:
        return self.logprobs is None and self.top_logprobs is None and self.activations is None

    def payload(self) -> dict[str, Any]:
        return _with_annotations({"text": self.text}, self)


@dataclass(slots=True)
class PromptEvent:
    """The prompt as the model read it, one entry per character (sent before any text)."""

    text: str
    logprobs: list[float | None] | None = None  # None for a first character with nothing before it
    top_logprobs: list[TopLogprobs | None] | None = None
    activations: list[list[float]] | None = None
    ranks: list[int | None] | None = None  # each character's rank among the model's predictions (0 = likeliest)

    def payload(self) -> dict[str, Any]:
        return _with_annotations({"prompt": self.text}, self)


def _with_annotations(body: dict[str, Any], event: TextEvent | PromptEvent) -> dict[str, Any]:
    """The annotations that were asked for, one entry per character, beside the text."""
    for key in ("logprobs", "top_logprobs", "activations"):
        value = getattr(event, key)
        if value is not None:
            body[key] = value
    return body


@dataclass(slots=True)
class DoneEvent:
    """The scheduler's last word on a job that ended normally."""

    finish_reason: str  # length | stop | cancelled | fed
    generated_chars: int


@dataclass(slots=True)
class ErrorEvent:
    """The scheduler's last word on a job that failed; `code` picks the error the client sees."""

    code: str  # engine_error | internal | shutting_down | invalid_input
    message: str
    field: str | None = None  # the request field at fault (invalid_input: the constraint's field)


Event = TextEvent | PromptEvent | DoneEvent | ErrorEvent
FINAL_EVENTS = (DoneEvent, ErrorEvent)


@dataclass(slots=True)
class Completed:
    """A generation that ended normally, with what the final frame reports."""

    finish_reason: str
    prompt_chars: int
    generated_chars: int
    model: str
    session_id: str | None

    def payload(self) -> dict[str, Any]:
        return {
            "finish_reason": self.finish_reason,
            "usage": {"prompt_chars": self.prompt_chars, "generated_chars": self.generated_chars},
            "model": self.model,
            "session_id": self.session_id,
        }


@dataclass(slots=True)
class Failed:
    """A generation that ended with an error; the same error a non-streaming request raises."""

    error: ApiError

    def payload(self) -> dict[str, Any]:
        return {"error": self.error.to_dict()}


StreamEvent = TextEvent | PromptEvent | Completed | Failed

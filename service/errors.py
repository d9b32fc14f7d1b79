"""Errors the service turns into clear responses: HTTP status, a code, and a message naming the problem."""

from __future__ import annotations


class ServiceConfigError(Exception):
    """A setting that cannot work: the server refuses to start with a one-line message."""


class ApiError(Exception):
    """A request the service refuses; routes map it to JSON `{"error": {...}}` with `status`."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}

    def to_dict(self) -> dict[str, str]:
        body = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class InvalidJson(ApiError):
    status = 400
    code = "invalid_json"


class InvalidMessage(ApiError):
    """A WebSocket message that is JSON but not a message (no object, no type, an unknown type)."""

    status = 422
    code = "invalid_message"


class UnknownMessageType(InvalidMessage):
    code = "unknown_type"


class ConnectionBusy(ApiError):
    """A WebSocket `generate` or `feed` while the connection's generation runs."""

    status = 409
    code = "busy"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class InvalidInput(ApiError):
    status = 422
    code = "invalid_input"


class TooLarge(ApiError):
    status = 413
    code = "too_large"


class PermissionDenied(ApiError):
    """A key without the scope a route needs, or a request the OpenAI API allows that charstream's
    OpenAI routes refuse (see their docs)."""

    status = 403
    code = "permission_denied"


class SessionBusy(ApiError):
    status = 409
    code = "session_busy"


class LeaseLost(ApiError):
    """A request outlived its lease on a session and another request took it: its state was not saved."""

    status = 409
    code = "lease_lost"


class CorruptSession(ApiError):
    """A stored session record that cannot be decoded: it is gone for good."""

    status = 410
    code = "session_corrupt"


class StateRefused(ApiError):
    """A portable state that cannot be used here: another model or weights, wrong shapes, non-finite
    values, a truncated or over-long blob, or a signature that does not match."""

    status = 409
    code = "state_refused"


class ForeignSession(ApiError):
    """A record made by another model, or by another version of this model's file."""

    status = 409
    code = "session_model_mismatch"


class TooManySessions(ApiError):
    status = 429
    code = "too_many_sessions"


class RateLimited(ApiError):
    """A key (or, without keys, a client address) over one of its limits: retry after Retry-After."""

    status = 429
    code = "rate_limited"


class TooManyConnections(ApiError):
    """The process holds CHARSTREAM_MAX_CONNECTIONS open requests and WebSockets: retry shortly."""

    status = 429
    code = "too_many_connections"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field, headers={"Retry-After": "1"})


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class ModelUnavailable(ApiError):
    status = 503
    code = "model_unavailable"


class EngineFailed(ApiError):
    """onnxruntime raised while reading a prompt or stepping: the model, not the request, failed."""

    status = 503
    code = "engine_error"


class InternalError(ApiError):
    status = 500
    code = "internal"


class ShuttingDown(ApiError):
    """The server is draining for a restart; another replica (or this one, later) can serve it."""

    status = 503
    code = "shutting_down"

    def __init__(self, message: str = "the server is shutting down; retry", field: str | None = None) -> None:
        super().__init__(message, field, headers={"Retry-After": "1", "Connection": "close"})


class StoreUnavailable(ApiError):
    """The session store (Redis) cannot be reached or refused the command: retry shortly."""

    status = 503
    code = "store_unavailable"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field, headers={"Retry-After": "1"})


# The scheduler names a failure by code; this is the error the client then sees.
FAILURES: dict[str, type[ApiError]] = {
    EngineFailed.code: EngineFailed,
    InternalError.code: InternalError,
    ShuttingDown.code: ShuttingDown,
    InvalidInput.code: InvalidInput,  # a constraint that reached a dead end mid-generation
}


def failure(code: str, message: str, field: str | None = None) -> ApiError:
    """The ApiError for a scheduler failure code (an unknown code is an internal error), naming `field`."""
    return FAILURES.get(code, InternalError)(message, field)

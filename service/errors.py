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


class NotFound(ApiError):
    status = 404
    code = "not_found"


class InvalidInput(ApiError):
    status = 422
    code = "invalid_input"


class TooLarge(ApiError):
    status = 413
    code = "too_large"


class SessionBusy(ApiError):
    status = 409
    code = "session_busy"


class TooManySessions(ApiError):
    status = 429
    code = "too_many_sessions"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class ModelUnavailable(ApiError):
    status = 503
    code = "model_unavailable"

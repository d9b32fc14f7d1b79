"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the statuses vLLM uses.

Every error on the OpenAI routes goes through `openai_error` (app.py registers it for their paths),
so the `openai` client raises its typed exceptions: 400 BadRequestError (every invalid request,
as vLLM answers them: bad JSON, a value out of range, a field a character model cannot honour,
characters outside the vocabulary, a prompt over the limit), 401 AuthenticationError,
403 PermissionDeniedError, 404 NotFoundError, 409 ConflictError (a session that is busy),
429 RateLimitError, 5xx InternalServerError. `code` keeps charstream's own error code.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from service.api.errors import documented, error_classes
from service.api.openai.protocol import OpenAIErrorBody, OpenAIErrorResponse
from service.errors import ApiError

# charstream's names for fields that OpenAI names otherwise.
OPENAI_FIELDS = {"max_new_chars": "max_tokens", "top_logprobs": "logprobs"}
# Invalid requests are all 400, as vLLM answers them (charstream's own routes use 413 and 422 too).
BAD_REQUEST_STATUSES = {413, 422}


def openai_status(status: int) -> int:
    return 400 if status in BAD_REQUEST_STATUSES else status


ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    410: "GoneError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
}

# The statuses an OpenAI route can answer with, for the OpenAPI schema: every error class's, as OpenAI's.
OPENAI_ERRORS = documented(OpenAIErrorResponse, (openai_status(cls.status) for cls in error_classes()))


def openai_error_body(error: ApiError) -> tuple[int, OpenAIErrorResponse]:
    """The status and body an ApiError takes on the OpenAI routes."""
    status = openai_status(error.status)
    message, param = error.message, error.field
    if param in OPENAI_FIELDS:
        message, param = message.replace(param, OPENAI_FIELDS[param]), OPENAI_FIELDS[param]
    kind = ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "APIError")
    return status, OpenAIErrorResponse(error=OpenAIErrorBody(message=message, type=kind, param=param, code=error.code))


def openai_error(error: ApiError) -> JSONResponse:
    status, body = openai_error_body(error)
    return JSONResponse(body.model_dump(), status_code=status, headers=error.headers or None)

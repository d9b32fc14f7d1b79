"""Error responses: one builder for every error body the HTTP API sends, the handlers that turn
exceptions into them, and the status lists the OpenAPI schema documents (made from the error classes).

charstream's own routes answer `{"error": {"code", "message", "field"?}}`. A route family that
speaks another wire format (OpenAI's, say) registers its own builder for its path prefix, and
every error on those paths (401 from the gate, 404, 422, 429...) then takes that shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from service import errors
from service.errors import ApiError, InternalError, InvalidInput, InvalidJson

log = logging.getLogger("charstream.app")

ErrorBuilder = Callable[[ApiError], JSONResponse]
BODY_PARSE_FAILED = "There was an error parsing the body"  # FastAPI's detail when reading the body raised


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_classes() -> list[type[ApiError]]:
    """Every error the service can answer with: the ApiError subclasses of service/errors.py."""
    return [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, ApiError) and value is not ApiError
    ]


def documented(body: type[BaseModel], statuses: Iterable[int] | None = None) -> dict[int | str, dict[str, object]]:
    """The `responses` of a router: each status (by default every error class's) with its body schema."""
    codes = sorted(set(statuses if statuses is not None else (cls.status for cls in error_classes())))
    return {code: {"model": body} for code in codes}


# The statuses charstream's own routes answer with: every error class's.
NATIVE_ERRORS = documented(ErrorResponse)


def native_error(error: ApiError) -> JSONResponse:
    return JSONResponse({"error": error.to_dict()}, status_code=error.status, headers=error.headers or None)


_styles: list[tuple[str, ErrorBuilder]] = []


def register_error_style(path_prefix: str, builder: ErrorBuilder) -> None:
    """Errors on paths under `path_prefix` use `builder` (the longest matching prefix wins; registering
    a prefix again replaces its builder)."""
    _styles[:] = [style for style in _styles if style[0] != path_prefix]
    _styles.append((path_prefix, builder))
    _styles.sort(key=lambda item: len(item[0]), reverse=True)


def error_response(error: ApiError, path: str) -> JSONResponse:
    for prefix, builder in _styles:
        if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
            return builder(error)
    return native_error(error)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc, request.url.path)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """422 naming the field and the problem; 400 for a body that is not JSON at all."""
    assert isinstance(exc, RequestValidationError)
    found = exc.errors()
    first = found[0] if found else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    field = ".".join(loc) or None
    error: ApiError
    if first.get("type") == "json_invalid":
        error = InvalidJson(f"request body is not valid JSON: {first.get('msg')}")
    elif first.get("type") == "missing" and not loc:
        error = InvalidInput("request body is required")
    else:
        error = InvalidInput(f"{field}: {first.get('msg')}" if field else str(first.get("msg")), field=field)
    return error_response(error, request.url.path)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == BODY_PARSE_FAILED:  # e.g. JSON nested deeper than the parser goes
        return error_response(InvalidJson("request body is not usable JSON (nested too deeply?)"), request.url.path)
    error = ApiError(str(exc.detail), headers=getattr(exc, "headers", None))
    error.status, error.code = exc.status_code, "http_error"
    return error_response(error, request.url.path)


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, RecursionError):  # JSON nested deeper than the parser goes: the client's fault
        return error_response(InvalidJson("request body is not usable JSON: nested too deeply"), request.url.path)
    log.exception("unhandled error", extra={"path": request.url.path})
    return error_response(InternalError("internal server error"), request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    """Every exception a route can raise becomes an error response in its path's style."""
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)

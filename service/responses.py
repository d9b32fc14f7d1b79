"""Error responses: one builder for every error body the HTTP API sends.

charstream's own routes answer `{"error": {"code", "message", "field"?}}`. A route family that
speaks another wire format (OpenAI's, say) registers its own builder for its path prefix, and
every error on those paths (401 from the gate, 404, 422, 429...) then takes that shape.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import JSONResponse

from service.errors import ApiError

ErrorBuilder = Callable[[ApiError], JSONResponse]


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

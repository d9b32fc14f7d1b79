"""The FastAPI application: lifespan (models, schedulers, TTL sweeper), error handlers, routers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, ServiceConfigError
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.routes import http, ops, ws
from service.serving import GenerationService
from service.settings import Settings, load_settings

log = logging.getLogger("charstream.app")

SWEEP_INTERVAL_S = 5.0


def _error(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _error(exc.status, exc.code, exc.message, exc.field, exc.headers)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """422 naming the field and the problem; 400 for a body that is not JSON at all."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    field = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return _error(400, "invalid_json", f"request body is not valid JSON: {first.get('msg')}")
    if first.get("type") == "missing" and not loc:
        return _error(422, "invalid_input", "request body is required")
    message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
    return _error(422, "invalid_input", message, field)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _error(exc.status_code, "http_error", str(exc.detail), headers=getattr(exc, "headers", None))


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"path": request.url.path})
    return _error(500, "internal", "internal server error")


class RequestMetrics:
    """Counts requests by method, route template and status (pure ASGI: streaming stays streaming)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()


def load_registry(settings: Settings) -> ModelRegistry:
    """The models folder, loaded; with CHARSTREAM_REQUIRE_MODELS, any failure stops the start."""
    registry = ModelRegistry.load(settings.models_dir, settings.variant, settings.ort_threads, settings.default_model)
    if settings.require_models and (registry.failures or not registry.ready):
        reasons = "; ".join(f"{k}: {v}" for k, v in registry.failures.items())
        raise ServiceConfigError(f"CHARSTREAM_REQUIRE_MODELS is set and models failed: {reasons}")
    return registry


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """The app; the models folder is loaded at start-up unless a loaded `registry` is given."""
    settings = settings or load_settings()
    metrics = Metrics()
    service: GenerationService | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal service
        service = GenerationService.create(registry or load_registry(settings), settings, metrics)
        app.state.service = service
        app.state.settings = settings
        service.start()
        sweeper = asyncio.create_task(_sweep(service))
        log.info(
            "charstream ready",
            extra={
                "models": ",".join(service.registry.models),
                "failed": len(service.registry.failures),
            },
        )
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await service.stop()
            log.info("charstream stopped")

    app = FastAPI(
        title="charstream",
        summary="Stateful streaming from character-level recurrent language models.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.include_router(ops.router)
    app.include_router(http.router)
    app.include_router(ws.router)
    return app


async def _sweep(service: GenerationService) -> None:
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        try:
            await service.evict_expired()
        except Exception:
            log.exception("session sweep failed")


def app_from_env() -> FastAPI:
    """uvicorn factory: `uvicorn --factory service.app:app_from_env`."""
    return create_app()

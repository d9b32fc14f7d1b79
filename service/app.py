"""The FastAPI application: lifespan (models, schedulers, TTL sweeper), error handlers, routers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.deps import verify_api_key
from service.errors import ApiError, InternalError, InvalidInput, InvalidJson, ServiceConfigError
from service.gate import Gate
from service.metrics import Metrics
from service.openai.errors import openai_error
from service.openapi import with_model_limits
from service.registry import ModelRegistry
from service.responses import error_response, register_error_style
from service.routes import http, openai, ops, playground, ws
from service.serving import GenerationService
from service.settings import Settings, load_settings

log = logging.getLogger("charstream.app")

SWEEP_INTERVAL_S = 5.0
BODY_PARSE_FAILED = "There was an error parsing the body"  # FastAPI's detail when reading the body raised


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc, request.url.path)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """422 naming the field and the problem; 400 for a body that is not JSON at all."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
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
    # Added last, so it runs first: the key and the drain are checked before anything else.
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(
        Gate,
        check_key=lambda conn: verify_api_key(conn, settings.api_key),
        draining=lambda: service is not None and service.draining,
    )
    app.include_router(ops.router)
    app.include_router(http.router)
    app.include_router(openai.router)
    for path in openai.OPENAI_PATHS:  # every error there in OpenAI's shape, 401 from the gate included
        register_error_style(path, openai_error)
    app.include_router(ws.router)
    app.include_router(playground.api)
    app.include_router(playground.router)
    with_model_limits(app, settings, lambda: service.registry if service is not None else registry)
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

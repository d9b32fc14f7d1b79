"""The FastAPI application: the lifespan (models, service, session sweeper) and the routers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from service.api import admin, ops, tracing
from service.api.errors import install_error_handlers, register_error_style
from service.api.keys import load_keyring
from service.api.limits import with_model_limits
from service.api.middleware import BodyLimit, ConnectionLimit, Gate, RequestMetrics
from service.api.native import routes as native
from service.api.native import ws
from service.api.openai import routes as openai
from service.api.openai.errors import openai_error
from service.api.playground import routes as playground
from service.api.quotas import RateLimits
from service.metrics import Metrics
from service.serving.facade import GenerationService
from service.serving.registry import ModelRegistry, load_registry
from service.serving.swaps import ModelSwapper
from service.settings import Settings, load_settings

log = logging.getLogger("charstream.app")

SWEEP_INTERVAL_S = 5.0


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """The app; the models folder is loaded at start-up unless a loaded `registry` is given."""
    settings = settings or load_settings()
    keyring = load_keyring(settings)
    metrics = Metrics()
    rate_limits = RateLimits(settings, metrics)
    rate_limits.publish(keyring)
    service: GenerationService | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal service
        service = GenerationService.create(registry or load_registry(settings), settings, metrics)
        app.state.service = service
        app.state.settings = settings
        app.state.keyring = keyring
        app.state.rate_limits = rate_limits
        service.start()
        sweeper = asyncio.create_task(_sweep(service))
        swapper = app.state.swapper = ModelSwapper(service)
        poller = asyncio.create_task(swapper.poll_forever(settings.model_poll_s)) if settings.model_poll_s else None
        log.info(
            "charstream ready",
            extra={
                "models": ",".join(service.registry.models),
                "failed": len(service.registry.failures),
                "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],  # asyncio or uvloop
            },
        )
        try:
            yield
        finally:
            sweeper.cancel()
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            await swapper.close()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await service.stop()
            await rate_limits.close()
            tracing.shutdown(app)
            log.info("charstream stopped")

    app = FastAPI(
        title="charstream",
        summary="Stateful streaming from character-level recurrent language models.",
        version="0.1.0",
        lifespan=lifespan,
        # With CHARSTREAM_DOCS=false the schema and its pages are not served: a public deployment
        # need not list its routes to every visitor.
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    install_error_handlers(app)
    tracing.instrument(app)  # off unless OTEL_* variables turn it on
    # Added last, so it runs first: the key and the drain are checked before anything else, then the body's size.
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(ConnectionLimit, limit=settings.max_connections, metrics=metrics)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(
        Gate,
        keyring=keyring,
        limits=rate_limits,
        draining=lambda: service is not None and service.draining,
        metrics_need_key=settings.metrics_need_key,
    )
    app.include_router(ops.router)
    app.include_router(admin.router)
    app.include_router(native.router)
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
    """uvicorn factory: `uvicorn --factory service.api.app:app_from_env`."""
    return create_app()

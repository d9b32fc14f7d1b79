"""`charstream serve`: uvicorn with charstream's settings and structured logs."""

from __future__ import annotations

from pathlib import Path

from service.logs import configure, log_config
from service.settings import load_settings


def serve(models: str | None = None, host: str | None = None, port: int | None = None) -> int:
    import uvicorn

    from service.app import create_app, load_registry
    from service.server import GracefulServer

    overrides: dict[str, object] = {}
    if models is not None:
        overrides["models_dir"] = Path(models)
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = load_settings(**overrides)
    configure(settings.log_level, settings.log_json)
    registry = load_registry(settings)  # before uvicorn, so a start-up failure is one clear line
    app = create_app(settings, registry)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=log_config(settings.log_level, settings.log_json),
        # The drain (GracefulServer) has already ended every generation by then: this only bounds
        # connections that are still closing.
        timeout_graceful_shutdown=5,
        ws_ping_interval=20,
        # Frames here are a few characters each: compressing them costs CPU on both ends and a
        # deflate context per connection, and saves nothing.
        ws_per_message_deflate=False,
        lifespan="on",
    )
    server = GracefulServer(config, app, settings.shutdown_grace_s)
    server.run()
    # uvicorn returns quietly when it cannot start (e.g. the port is taken): say so in the exit code.
    return 0 if server.started else 3

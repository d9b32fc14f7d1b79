"""`charstream serve`: uvicorn with charstream's settings and structured logs."""

from __future__ import annotations

import socket
from pathlib import Path

from service.logs import configure, log_config
from service.settings import load_settings


def serve(
    models: str | None = None, host: str | None = None, port: int | None = None, workers: int | None = None
) -> int:
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
    if workers is not None:
        overrides["workers"] = workers
    settings = load_settings(**overrides)
    configure(settings.log_level, settings.log_json)
    if settings.workers > 1:
        from service.workers import Supervisor, worker_command

        return Supervisor(settings, worker_command()).run()
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
    # With several processes on one port (workers, or containers sharing a host's port) each binds
    # it with SO_REUSEPORT and the kernel spreads the connections.
    server.run(sockets=[reuse_port_socket(settings.host, settings.port)] if settings.reuse_port else None)
    # uvicorn returns quietly when it cannot start (e.g. the port is taken): say so in the exit code.
    return 0 if server.started else 3


def reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock

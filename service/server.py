"""Running the server (`charstream serve`, `python -m service`): settings, then one uvicorn process
or a supervisor of W worker processes, with charstream's graceful shutdown in front of uvicorn's own.

On SIGTERM uvicorn closes WebSockets at once (1012) and gives HTTP tasks a fixed timeout before
cancelling them with a traceback. Here the listening sockets close first, then the service
drains (running generations get `CHARSTREAM_SHUTDOWN_GRACE_S` to finish; whatever remains ends
with a `shutting_down` error event, and WebSockets close with 1001), and only then does uvicorn
close what is left, by which time nothing is running.
"""

from __future__ import annotations

import ipaddress
import logging
import resource
import socket
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from service.api.keys import Keyring, load_keyring
from service.errors import ServiceConfigError
from service.logs import configure, log_config
from service.settings import Settings, load_settings

log = logging.getLogger("charstream.server")

# File descriptors beyond the connections: the models, the log, Redis's pool, the listening socket.
SPARE_FDS = 256


def fit_file_limit(connections: int) -> int:
    """Raise this process's soft file-descriptor limit (up to the hard one) so that `connections`
    fit: the usual soft default, 1,024, would end accepting far below CHARSTREAM_MAX_CONNECTIONS.
    Returns the limit now in force, with a warning when the hard limit keeps it too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "the file-descriptor limit is below CHARSTREAM_MAX_CONNECTIONS",
            extra={"limit": soft, "max_connections": connections},
        )
    return soft


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float) -> None:
        super().__init__(config)
        self.fastapi_app = app
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting: a balancer's next try goes to another replica
            server.close()
        service = getattr(self.fastapi_app.state, "service", None)
        if service is not None and not self.force_exit:
            await service.drain(self.grace_s)
        await super().shutdown(sockets)


def serve(
    models: str | None = None, host: str | None = None, port: int | None = None, workers: int | None = None
) -> int:
    from service.api.app import create_app
    from service.serving.registry import load_registry

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
    check_exposure(settings, load_keyring(settings, create_key=True))
    configure(settings.log_level, settings.log_json)
    fit_file_limit(settings.max_connections)
    if settings.session_store != "memory":
        from service.sessions.redis_store import check_credentials

        check_credentials(settings.session_store)  # a refused password stops the start with one line
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
        ws_max_size=settings.max_ws_message_bytes,  # a longer message is refused before it is read
        lifespan="on",
        loop=settings.event_loop,
    )
    server = GracefulServer(config, app, settings.shutdown_grace_s)
    # With several processes on one port (workers, or containers sharing a host's port) each binds
    # it with SO_REUSEPORT and the kernel spreads the connections.
    server.run(sockets=[reuse_port_socket(settings.host, settings.port)] if settings.reuse_port else None)
    # uvicorn returns quietly when it cannot start (e.g. the port is taken): say so in the exit code.
    return 0 if server.started else 3


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(settings: Settings, keyring: Keyring) -> None:
    """Refuse to serve other machines with no key at all, unless the operator said so explicitly."""
    if keyring.enabled or settings.allow_unauthenticated or is_loopback(settings.host):
        return
    raise ServiceConfigError(
        f"CHARSTREAM_HOST={settings.host} is reachable from other machines and no API key is set: set "
        "CHARSTREAM_API_KEY, CHARSTREAM_API_KEY_FILE or CHARSTREAM_KEYS_FILE, or CHARSTREAM_ALLOW_UNAUTHENTICATED=1 "
        "to let anyone call"
    )


def reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock

"""What every request meets before a route: the API key and the drain (the gate), the connection
limit, and request metrics.

Both are pure ASGI, so a request that fails the gate is answered without reading its body (a client
without the key cannot make the server parse megabytes), and streaming responses pass through
untouched. The gate covers HTTP under /v1/; a WebSocket checks the same key with `verify_api_key`
in its route, before reading any message, since a refused handshake is the route's to close.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from pydantic import SecretStr
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.errors import ApiError, ShuttingDown, TooManyConnections, Unauthorized
from service.metrics import Metrics

PROTECTED_PREFIX = "/v1/"
WS_TRY_AGAIN_LATER = 1013


def verify_api_key(conn: HTTPConnection, expected: SecretStr | None) -> None:
    """Raise Unauthorized unless the connection carries `expected` (nothing is needed when it is None).

    With CHARSTREAM_API_KEY set, /v1 needs `Authorization: Bearer KEY` or `X-API-Key: KEY`.
    """
    if expected is None:
        return
    auth = conn.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else conn.headers.get("x-api-key")
    if given is None and conn.scope["type"] == "websocket":
        given = conn.query_params.get("api_key")  # browsers cannot set WebSocket headers
    if given is None or not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("missing or wrong API key (Authorization: Bearer KEY or X-API-Key: KEY)")


class Gate:
    def __init__(self, app: ASGIApp, api_key: SecretStr | None, draining: Callable[[], bool]) -> None:
        self.app = app
        self.api_key = api_key
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        try:
            verify_api_key(HTTPConnection(scope), self.api_key)
            if self.draining():
                raise ShuttingDown()
        except ApiError as exc:
            await error_response(exc, scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ConnectionLimit:
    """At most `limit` /v1 requests and WebSockets open at once in this process.

    Past it, before anything is read, an HTTP request gets 429 `too_many_connections` with
    Retry-After, and a WebSocket is accepted and closed at once with 1013 (try again later), the
    code a client can tell from a refusal. Health, readiness and metrics stay reachable, so a full
    replica is not restarted by its probes. The bound keeps a flood of connections from exhausting
    the process's file descriptors and memory while the streams it already has keep flowing.
    """

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.open = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        if self.open >= self.limit:
            self.metrics.refused_connections.inc()
            await self._refuse(scope, receive, send)
            return
        self.open += 1
        self.metrics.open_connections.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1
            self.metrics.open_connections.dec()

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the server holds its maximum of {self.limit} open connections; retry shortly"
        if scope["type"] == "http":
            await error_response(TooManyConnections(message), scope["path"])(scope, receive, send)
            return
        if (await receive())["type"] != "websocket.connect":
            return  # the client left before its handshake
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": WS_TRY_AGAIN_LATER, "reason": message[:120]})


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

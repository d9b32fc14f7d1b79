"""What every request meets before a route: the key and its scope, the drain (the gate), the body's
size, the connection limit, and request metrics.

All are pure ASGI, so a request that fails the gate or is too large is answered without reading
its body (a client without a key cannot make the server parse megabytes), and streaming responses
pass through untouched. The gate covers HTTP under /v1/ (and /metrics when it needs a key); a
WebSocket is authenticated by its route, which must accept the handshake to say why it refuses.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.auth import authenticate, required_scope
from service.api.errors import error_response
from service.api.keys import Keyring
from service.api.quotas import RateLimits
from service.errors import ApiError, ShuttingDown, TooLarge, TooManyConnections
from service.metrics import Metrics

PROTECTED_PREFIX = "/v1/"
METRICS_PATH = "/metrics"
WS_TRY_AGAIN_LATER = 1013


class Gate:
    """Every /v1 request's key and scope, the drain, then the key's request rate. The key found
    rides on `request.state.api_key`."""

    def __init__(
        self,
        app: ASGIApp,
        keyring: Keyring,
        limits: RateLimits,
        draining: Callable[[], bool],
        metrics_need_key: bool = False,
    ) -> None:
        self.app = app
        self.keyring = keyring
        self.limits = limits
        self.draining = draining
        self.metrics_need_key = metrics_need_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        guarded = path.startswith(PROTECTED_PREFIX) or (self.metrics_need_key and path == METRICS_PATH)
        if scope["type"] != "http" or not guarded:
            await self.app(scope, receive, send)
            return
        try:
            needed = "metrics" if path == METRICS_PATH else required_scope(path)
            key = authenticate(HTTPConnection(scope), self.keyring, needed)
            if self.draining():
                raise ShuttingDown()
            client = scope.get("client")
            await self.limits.charge(self.limits.caller(key, client[0] if client else None), "requests_per_s")
        except ApiError as exc:
            await error_response(exc, path)(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


class BodyLimit:
    """Request bodies of at most `limit` bytes: 413 before the body is parsed, with or without nginx.

    A declared Content-Length over the limit is refused before a byte is read. A chunked body has
    no length: it is read here up to the limit (and refused past it), then handed on whole.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self) -> TooLarge:
        return TooLarge(f"the request body is over {self.limit} bytes (CHARSTREAM_MAX_BODY_BYTES)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.limit:
                await error_response(self._too_large(), scope["path"])(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server reads no more than it declared
            return
        if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await error_response(self._too_large(), scope["path"])(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


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

"""The first thing every HTTP request meets: the API key, then the drain, before any body is read.

Pure ASGI, so a request that fails here is answered without reading its body (a client without
the key cannot make the server parse megabytes), and streaming responses pass through untouched.
WebSockets check the key in their route, before reading any message.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ApiError, ShuttingDown
from service.responses import error_response

PROTECTED_PREFIX = "/v1/"


class Gate:
    def __init__(
        self,
        app: ASGIApp,
        check_key: Callable[[HTTPConnection], None],
        draining: Callable[[], bool],
    ) -> None:
        self.app = app
        self.check_key = check_key
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        try:
            self.check_key(HTTPConnection(scope))
            if self.draining():
                raise ShuttingDown()
        except ApiError as exc:
            await error_response(exc, scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)

"""uvicorn's server with charstream's graceful shutdown in front of uvicorn's own.

On SIGTERM uvicorn closes WebSockets at once (1012) and gives HTTP tasks a fixed timeout before
cancelling them with a traceback. Here the listening sockets close first, then the service
drains (running generations get `CHARSTREAM_SHUTDOWN_GRACE_S` to finish; whatever remains ends
with a `shutting_down` error event, and WebSockets close with 1001), and only then does uvicorn
close what is left, by which time nothing is running.
"""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI


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

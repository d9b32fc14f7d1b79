"""A lean WebSocket load client: websockets' sans-I/O protocol driven by asyncio callbacks.

The load client shares this machine's two cores with the server it measures, so every
microsecond it spends per message is taken from the server and shows up as server latency.
websockets' `connect()` client pays for a reader task, a message queue and a coroutine hand-off
per message; this one parses frames with the same library's protocol object inside
`data_received` and stamps each character with the time its bytes arrived. Run it on uvloop.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import cast

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri


class StreamResult:
    def __init__(self) -> None:
        self.t0 = 0.0  # when the generate message was sent, after the handshake
        self.arrivals: list[float] = []  # one timestamp per character received
        self.frames = 0  # text messages received (a message carries one or more characters)
        self.final: dict[str, object] | None = None  # the done or error message


class _GenerateProtocol(asyncio.Protocol):
    """One connection: handshake, one generate message, characters until done, then close."""

    def __init__(
        self, url: str, request: dict[str, object], finished: asyncio.Future[StreamResult], result: StreamResult
    ) -> None:
        self.ws = ClientProtocol(parse_uri(url), max_size=None)
        self.request = json.dumps(request).encode()
        self.finished = finished
        self.result = result
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.ws.send_request(self.ws.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Response):
                if event.status_code != 101:
                    self._finish(RuntimeError(f"handshake refused: HTTP {event.status_code}"))
                    return
                self.result.t0 = time.perf_counter()
                self.ws.send_text(self.request)
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                message = json.loads(bytes(event.data))
                if message["type"] == "text":
                    self.result.arrivals.extend([now] * len(message["text"]))
                    self.result.frames += 1
                elif message["type"] in ("done", "error"):
                    self.result.final = message
                    self.ws.send_close()
                    self._finish(None)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionError("the server closed the connection before done"))

    def _flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            for chunk in self.ws.data_to_send():
                if chunk:
                    self.transport.write(chunk)
                else:  # end of stream: the closing handshake is done on our side
                    self.transport.close()

    def _finish(self, error: Exception | None) -> None:
        if self.finished.done():
            return
        if error is None:
            self.finished.set_result(self.result)
        else:
            self.finished.set_exception(error)
        if self.transport is not None and error is not None:
            self.transport.close()


async def generate(
    host: str, port: int, request: dict[str, object], result: StreamResult | None = None
) -> StreamResult:
    """Open /v1/stream, send one generate message, and collect arrival times until done."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[StreamResult] = loop.create_future()
    url = f"ws://{host}:{port}/v1/stream"
    # A caller that may cancel the stream passes its own `result` to keep what arrived before.
    into = result if result is not None else StreamResult()
    transport, _ = await loop.create_connection(lambda: _GenerateProtocol(url, request, finished, into), host, port)
    try:
        return await finished
    finally:
        transport.close()

"""The WebSocket protocol at /v1/stream: JSON messages, one session per connection, many generations.

Client: {"type": "generate", session_id?, model?, prompt?, seed?, ...sampling}
        {"type": "feed", text, session_id?, model?}   {"type": "cancel"}
Server: {"type": "session", id, model, replaces?}  {"type": "prompt", prompt, activations?, ...}
        {"type": "text", text, logprobs?, top_logprobs?, activations?}  {"type": "fed", history_chars, usage}
        {"type": "done", finish_reason, usage, model, session_id}  {"type": "error", code, message, field?}
A bad message gets an error message and the connection stays usable. While the connection is
open it keeps its session alive; if the session is gone anyway (deleted elsewhere), the next
generate starts a new one and says so in a `session` message with `replaces`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from service.api import budget
from service.api.auth import WS_PROTOCOL, authenticate, origin_allowed
from service.api.deps import get_service, get_settings
from service.api.native.schemas import WsCancel, WsFeed, WsGenerate
from service.api.quotas import RateLimits, caller_of, owner_of
from service.core.events import Completed, Failed, PromptEvent, StreamEvent, TextEvent
from service.core.generation import Generation
from service.errors import (
    ApiError,
    ConnectionBusy,
    InvalidInput,
    InvalidJson,
    InvalidMessage,
    NotFound,
    PermissionDenied,
    ShuttingDown,
    TooLarge,
    UnknownMessageType,
)
from service.serving import states
from service.serving.facade import GenerationService
from service.sessions.store import Owner

log = logging.getLogger("charstream.ws")
router = APIRouter()

TEXT_MESSAGE = '{"type": "text", "text": %s}'
MESSAGE_TYPES: dict[str, type[BaseModel]] = {"generate": WsGenerate, "feed": WsFeed, "cancel": WsCancel}
# How long a shutdown waits for a running generation's final message before closing.
SHUTDOWN_WAIT_S = 3.0
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or None
    return (f"{field}: {err['msg']}" if field else err["msg"]), field


def message_for(event: StreamEvent) -> str:
    """The WebSocket message for a generation event."""
    if isinstance(event, TextEvent) and event.plain:
        # The message sent most, once per character or few: built without a dict.
        return TEXT_MESSAGE % json.dumps(event.text, ensure_ascii=False)
    kind = "text" if isinstance(event, TextEvent) else "prompt" if isinstance(event, PromptEvent) else "done"
    if isinstance(event, Failed):
        return error_message(event.error)
    return json.dumps({"type": kind, **event.payload()}, ensure_ascii=False)


def error_message(error: ApiError) -> str:
    return json.dumps({"type": "error", **error.to_dict()}, ensure_ascii=False)


class Connection:
    def __init__(self, websocket: WebSocket, service: GenerationService) -> None:
        self.ws = websocket
        self.service = service
        self.owner = owner_of(websocket)  # the connection's key owns the sessions it makes and uses
        self.session_id: str | None = None
        self.generation: Generation | None = None
        self.pump: asyncio.Task[None] | None = None
        settings = service.settings
        self.max_message_bytes = settings.max_ws_message_bytes
        self.keepalive_s = min(60.0, settings.session_ttl_s / 3)

    async def send_text(self, text: str) -> None:
        if self.ws.application_state == WebSocketState.CONNECTED:
            await self.ws.send_text(text)

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_text(json.dumps(message, ensure_ascii=False))

    async def error(self, error: ApiError) -> None:
        await self.send_text(error_message(error))

    @property
    def busy(self) -> bool:
        return self.pump is not None and not self.pump.done()

    async def run(self) -> None:
        keepalive = asyncio.create_task(self.keep_session_alive())
        self.service.connection_closers.add(self.close_for_shutdown)
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                raw = message.get("text")
                if raw is None and message.get("bytes") is not None:
                    raw = message["bytes"].decode("utf-8", errors="replace")
                await self.handle(raw or "")
        except WebSocketDisconnect:
            return
        finally:
            self.service.connection_closers.discard(self.close_for_shutdown)
            keepalive.cancel()
            # The client is gone: its generation stops at the next step; the session stays until its TTL.
            if self.generation is not None:
                self.generation.cancel()
            if self.pump is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(self.pump, SHUTDOWN_WAIT_S)

    async def keep_session_alive(self) -> None:
        """Touch the connection's session well within its TTL, so an open connection never loses it."""
        while True:
            await asyncio.sleep(self.keepalive_s)
            if self.session_id is not None and not self.busy:
                with contextlib.suppress(ApiError):
                    await self.service.get_session(self.session_id, self.owner)

    async def close_for_shutdown(self) -> None:
        """At the end of a drain: let a running generation send its final message, then close 1001."""
        if self.pump is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self.pump), SHUTDOWN_WAIT_S)
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code=CLOSE_GOING_AWAY, reason="server shutting down")

    def parse(self, raw: str) -> BaseModel:
        """The message as its schema, or the ApiError to answer with."""
        if len(raw) > self.max_message_bytes:
            raise TooLarge(f"message has {len(raw)} characters; the limit is {self.max_message_bytes}")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidJson(f"message is not JSON: {exc.msg} at position {exc.pos}") from None
        except RecursionError:
            raise InvalidJson("message is not usable JSON: nested too deeply") from None
        if not isinstance(data, dict) or "type" not in data:
            raise InvalidMessage("message must be a JSON object with a 'type'", field="type")
        schema = MESSAGE_TYPES.get(data["type"]) if isinstance(data["type"], str) else None
        if schema is None:
            shown = repr(data["type"])[:40]
            raise UnknownMessageType(f"unknown message type {shown}; use generate, feed or cancel", field="type")
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            text, field = validation_message(exc)
            raise InvalidInput(text, field=field) from None

    async def handle(self, raw: str) -> None:
        try:
            msg = self.parse(raw)
            if isinstance(msg, WsCancel):
                if self.generation is not None:
                    self.generation.cancel()
            elif self.busy:
                raise ConnectionBusy("a generation is running on this connection; cancel it or wait for done")
            elif isinstance(msg, WsGenerate):
                await self.admit(budget.generation(msg.to_sampling_params(), len(msg.prompt)))
                await self.start_generation(msg)
            elif isinstance(msg, WsFeed):
                await self.admit(budget.reading(len(msg.text), 0, "text"))
                await self.feed(msg)
        except ApiError as exc:
            await self.error(exc)

    async def admit(self, work: budget.Work) -> None:
        """A message that starts work is a request: it counts against the key's request rate, and its
        work against the request budget and the key's character rate, as an HTTP request's would."""
        limits: RateLimits = self.ws.app.state.rate_limits
        await limits.charge(caller_of(self.ws), "requests_per_s")
        await budget.admit(self.ws, work)

    async def ensure_session(self, session_id: str | None, model: str | None, seed: int | None) -> str:
        if session_id is not None:
            await self.service.get_session(session_id, self.owner)  # 404 now, not mid-stream
            self.session_id = session_id
            return session_id
        replaces = None
        if self.session_id is not None:
            try:
                await self.service.get_session(self.session_id, self.owner)
                return self.session_id
            except NotFound:
                replaces = self.session_id  # deleted elsewhere: go on with a new one, and say so
        info = await self.service.create_session(model, "", seed, self.owner)
        self.session_id = info.id
        announce: dict[str, Any] = {"type": "session", "id": info.id, "model": info.model}
        if replaces is not None:
            announce["replaces"] = replaces
        await self.send(announce)
        return info.id

    async def start_generation(self, msg: WsGenerate) -> None:
        fresh = msg.session_id is None and self.session_id is None
        if msg.state is not None:
            if msg.session_id is not None:
                raise InvalidInput("state and session_id: send one (a session keeps its own state)", field="state")
            session_id = await self.session_from_state(msg)
            fresh = True  # the state's model and seed are the session's
        else:
            session_id = await self.ensure_session(msg.session_id, msg.model, msg.seed)
        self.generation = await self.service.generate(
            msg.to_sampling_params(),
            msg.prompt,
            model_id=None if fresh else msg.model,
            seed=None if fresh else msg.seed,
            session_id=session_id,
            owner=self.owner,
        )
        returned = (session_id, self.owner) if msg.return_state else None
        self.pump = asyncio.create_task(self.forward(self.generation, returned))

    async def session_from_state(self, msg: WsGenerate) -> str:
        """The connection's session, made anew from the message's state (and announced)."""
        assert msg.state is not None
        blob = states.from_text(msg.state)
        info = await self.service.create_session(msg.model, "", msg.seed, self.owner, blob)
        announce: dict[str, Any] = {"type": "session", "id": info.id, "model": info.model}
        if self.session_id is not None:
            announce["replaces"] = self.session_id
        self.session_id = info.id
        await self.send(announce)
        return info.id

    async def forward(self, generation: Generation, returned: tuple[str, Owner] | None = None) -> None:
        """The generation's messages; with `returned` (its session and owner), the done message
        carries the session's final state."""
        try:
            async for event in generation.stream():
                if returned is not None and isinstance(event, Completed):
                    message = {"type": "done", **event.payload()}
                    message["state"] = states.to_text(await self.service.get_session_state(*returned))
                    await self.send(message)
                    continue
                await self.send_text(message_for(event))
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client left mid-stream; leaving the loop cancelled the job
        except Exception:
            log.exception("stream failed")

    async def feed(self, msg: WsFeed) -> None:
        session_id = await self.ensure_session(msg.session_id, msg.model, None)
        info, chars = await self.service.feed(session_id, msg.text, self.owner)
        await self.send(
            {
                "type": "fed",
                "session_id": info.id,
                "history_chars": info.history_chars,
                "usage": {"prompt_chars": chars, "generated_chars": 0},
            }
        )


@router.websocket("/v1/stream")
async def stream(websocket: WebSocket) -> None:
    """Stream characters over a WebSocket; see the module docstring for the protocol."""
    service = get_service(websocket)
    settings = get_settings(websocket)
    # A browser that offered charstream's subprotocol (to carry its key) must get it back.
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol=WS_PROTOCOL if WS_PROTOCOL in offered else None)
    try:  # before any message is read
        if not origin_allowed(websocket, settings.allowed_origins):
            raise PermissionDenied(
                f"origin {websocket.headers.get('origin')!r} may not open this WebSocket (CHARSTREAM_ALLOWED_ORIGINS)"
            )
        websocket.scope.setdefault("state", {})["api_key"] = authenticate(
            websocket, websocket.app.state.keyring, "generate"
        )
    except ApiError as exc:
        await websocket.send_text(error_message(exc))
        await websocket.close(code=CLOSE_POLICY)
        return
    if service.draining:
        await websocket.send_text(error_message(ShuttingDown()))
        await websocket.close(code=CLOSE_GOING_AWAY)
        return
    service.metrics.websockets.inc()
    try:
        await Connection(websocket, service).run()
    finally:
        service.metrics.websockets.dec()

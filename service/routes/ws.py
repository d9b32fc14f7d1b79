"""The WebSocket protocol at /v1/stream: JSON messages, one session per connection, many generations.

Client: {"type": "generate", session_id?, model?, prompt?, seed?, ...sampling}
        {"type": "feed", text, session_id?, model?}   {"type": "cancel"}
Server: {"type": "session", id, model}  {"type": "text", text}  {"type": "fed", history_chars, usage}
        {"type": "done", finish_reason, usage, session_id}  {"type": "error", code, message, field?}
A bad message gets an error message and the connection stays usable.
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

from service.deps import check_api_key, get_service
from service.errors import ApiError
from service.scheduler import DoneEvent, ErrorEvent, TextEvent
from service.schemas import WsCancel, WsFeed, WsGenerate
from service.serving import Generation, GenerationService

log = logging.getLogger("charstream.ws")
router = APIRouter()

TEXT_MESSAGE = '{"type": "text", "text": %s}'
MESSAGE_TYPES: dict[str, type[BaseModel]] = {"generate": WsGenerate, "feed": WsFeed, "cancel": WsCancel}


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or None
    return (f"{field}: {err['msg']}" if field else err["msg"]), field


class Connection:
    def __init__(self, websocket: WebSocket, service: GenerationService) -> None:
        self.ws = websocket
        self.service = service
        self.session_id: str | None = None
        self.generation: Generation | None = None
        self.pump: asyncio.Task[None] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_json_text(json.dumps(message, ensure_ascii=False))

    async def send_json_text(self, text: str) -> None:
        if self.ws.application_state == WebSocketState.CONNECTED:
            await self.ws.send_text(text)

    async def error(self, code: str, message: str, field: str | None = None) -> None:
        body: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if field is not None:
            body["field"] = field
        await self.send(body)

    @property
    def busy(self) -> bool:
        return self.pump is not None and not self.pump.done()

    async def run(self) -> None:
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
            # The client is gone: its generation stops at the next step; the session stays until its TTL.
            if self.generation is not None:
                self.generation.cancel()
            if self.pump is not None:
                self.pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.pump

    async def handle(self, raw: str) -> None:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            await self.error("invalid_json", f"message is not JSON: {exc.msg} at position {exc.pos}")
            return
        if not isinstance(data, dict) or "type" not in data:
            await self.error("invalid_message", "message must be a JSON object with a 'type'", "type")
            return
        schema = MESSAGE_TYPES.get(data["type"]) if isinstance(data["type"], str) else None
        if schema is None:
            await self.error(
                "unknown_type",
                f"unknown message type {data['type']!r}; use generate, feed or cancel",
                "type",
            )
            return
        try:
            msg = schema.model_validate(data)
        except ValidationError as exc:
            text, field = validation_message(exc)
            await self.error("invalid_input", text, field)
            return
        try:
            if isinstance(msg, WsCancel):
                if self.generation is not None:
                    self.generation.cancel()
            elif self.busy:
                await self.error("busy", "a generation is running on this connection; cancel it or wait for done")
            elif isinstance(msg, WsGenerate):
                await self.start_generation(msg)
            elif isinstance(msg, WsFeed):
                await self.feed(msg)
        except ApiError as exc:
            await self.error(exc.code, exc.message, exc.field)

    async def ensure_session(self, session_id: str | None, model: str | None, seed: int | None) -> str:
        if session_id is not None:
            await self.service.get_session(session_id)  # 404 now, not mid-stream
            self.session_id = session_id
        elif self.session_id is None:
            info = await self.service.create_session(model, "", seed)
            self.session_id = info.id
            await self.send({"type": "session", "id": info.id, "model": info.model})
        return self.session_id

    async def start_generation(self, msg: WsGenerate) -> None:
        fresh = msg.session_id is None and self.session_id is None
        session_id = await self.ensure_session(msg.session_id, msg.model, msg.seed)
        self.generation = await self.service.generate(
            msg.to_sampling_params(),
            msg.prompt,
            model_id=None if fresh else msg.model,
            seed=None if fresh else msg.seed,
            session_id=session_id,
        )
        self.pump = asyncio.create_task(self.forward(self.generation))

    async def forward(self, generation: Generation) -> None:
        async for event in generation.events():
            if isinstance(event, TextEvent):
                if event.logprobs is None:
                    # The message sent most, once per character or few: built without a dict.
                    await self.send_json_text(TEXT_MESSAGE % json.dumps(event.text, ensure_ascii=False))
                else:
                    await self.send({"type": "text", "text": event.text, "logprobs": event.logprobs})
            elif isinstance(event, DoneEvent):
                await self.send(
                    {
                        "type": "done",
                        "finish_reason": event.finish_reason,
                        "usage": {
                            "prompt_chars": generation.prompt_chars,
                            "generated_chars": event.generated_chars,
                        },
                        "session_id": generation.session_id,
                    }
                )
            elif isinstance(event, ErrorEvent):
                await self.error(event.code, event.message)

    async def feed(self, msg: WsFeed) -> None:
        session_id = await self.ensure_session(msg.session_id, msg.model, None)
        info, chars = await self.service.feed(session_id, msg.text)
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
    await websocket.accept()
    try:
        check_api_key(websocket)
    except ApiError as exc:
        await websocket.send_text(json.dumps({"type": "error", "code": exc.code, "message": exc.message}))
        await websocket.close(code=1008)
        return
    service.metrics.websockets.inc()
    try:
        await Connection(websocket, service).run()
    finally:
        service.metrics.websockets.dec()

"""The /v1 HTTP API: models, one-shot and session generation (JSON or Server-Sent Events), sessions."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Response, status
from fastapi.responses import StreamingResponse

from service.deps import ServiceDep, require_api_key
from service.errors import InternalError
from service.events import Failed, TextEvent
from service.generation import Generation
from service.openai.errors import OPENAI_ERRORS
from service.schemas import (
    CreateSessionRequest,
    ErrorResponse,
    FeedRequest,
    FeedResponse,
    ForkRequest,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    SessionGenerateRequest,
    SessionInfo,
    Usage,
)

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 422, 429, 500, 503)
}

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERRORS)

log = logging.getLogger("charstream.http")
# The generate routes answer JSON, or Server-Sent Events with `stream: true`: both documented.
STREAMING: dict[int | str, dict[str, object]] = {
    200: {
        "description": "the generation (JSON), or with `stream: true` its events (Server-Sent Events)",
        "content": {"text/event-stream": {}},
    }
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = b"data: [DONE]\n\n"


def sse_frame(payload: object) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


async def sse_frames(generation: Generation) -> AsyncIterator[bytes]:
    """One `data:` frame per event (text, prompt, the final one or an error), then `[DONE]`."""
    try:
        async for event in generation.stream():
            if isinstance(event, TextEvent) and event.plain:
                # The frame sent most, once per character or few: built without a dict.
                yield f'data: {{"text": {json.dumps(event.text, ensure_ascii=False)}}}\n\n'.encode()
            else:
                yield sse_frame(event.payload())
    except Exception:  # a bug, not a client: the stream still ends with an error and [DONE]
        log.exception("stream failed")
        yield sse_frame(Failed(InternalError("the stream failed on the server")).payload())
    yield SSE_DONE


async def _respond(generation: Generation, stream: bool) -> GenerateResponse | StreamingResponse:
    if stream:
        return StreamingResponse(sse_frames(generation), media_type="text/event-stream", headers=SSE_HEADERS)
    result = await generation.result()
    done = result.completed
    return GenerateResponse(
        text=result.text,
        finish_reason=done.finish_reason,  # type: ignore[arg-type]
        usage=Usage(prompt_chars=done.prompt_chars, generated_chars=done.generated_chars),
        model=done.model,
        session_id=done.session_id,
        logprobs=result.logprobs,
        top_logprobs=result.top_logprobs,
        activations=result.activations,
        prompt_activations=None if result.prompt is None else result.prompt.activations,
    )


@router.get("/models", response_model=ModelList, responses=OPENAI_ERRORS)  # errors in OpenAI's shape there
async def list_models(service: ServiceDep) -> ModelList:
    """The loaded models, in the OpenAI list shape, with their cell, sizes and training facts."""
    return ModelList(data=[ModelCard(**m.describe()) for m in service.registry.models.values()])


@router.post("/generate", response_model=GenerateResponse, responses=STREAMING)
async def generate(request: GenerateRequest, service: ServiceDep) -> GenerateResponse | StreamingResponse:
    """Generate text from a prompt; `stream: true` answers as Server-Sent Events."""
    generation = await service.generate(
        request.to_sampling_params(),
        request.prompt,
        request.model,
        request.seed,
        request.session_id,
    )
    return await _respond(generation, request.stream)


@router.post("/sessions", response_model=SessionInfo, status_code=status.HTTP_201_CREATED)
async def create_session(request: CreateSessionRequest, service: ServiceDep) -> SessionInfo:
    """Create a session whose state the server keeps; an optional prompt primes it."""
    return await service.create_session(request.model, request.prompt, request.seed)


@router.get("/sessions/{session_id}", response_model=SessionInfo)
async def get_session(session_id: str, service: ServiceDep) -> SessionInfo:
    """A session's model, history length and expiry."""
    return await service.get_session(session_id)


@router.delete("/sessions/{session_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_session(session_id: str, service: ServiceDep) -> Response:
    """Delete a session and free its state."""
    await service.delete_session(session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/sessions/{session_id}/generate", response_model=GenerateResponse, responses=STREAMING)
async def session_generate(
    session_id: str, request: SessionGenerateRequest, service: ServiceDep
) -> GenerateResponse | StreamingResponse:
    """Continue a session from its kept state (after an optional prompt) and keep the new state."""
    generation = await service.generate(request.to_sampling_params(), request.prompt, session_id=session_id)
    return await _respond(generation, request.stream)


@router.post("/sessions/{session_id}/feed", response_model=FeedResponse)
async def feed(session_id: str, request: FeedRequest, service: ServiceDep) -> FeedResponse:
    """Advance a session's state over text without generating."""
    info, chars = await service.feed(session_id, request.text)
    return FeedResponse(session=info, usage=Usage(prompt_chars=chars, generated_chars=0))


@router.post("/sessions/{session_id}/fork", response_model=SessionInfo, status_code=status.HTTP_201_CREATED)
async def fork(session_id: str, service: ServiceDep, request: ForkRequest | None = None) -> SessionInfo:
    """A new session with a copy of this one's state (and RNG, unless a new seed is given)."""
    return await service.fork_session(session_id, request.seed if request else None)


@router.post("/sessions/{session_id}/reset", response_model=SessionInfo)
async def reset(session_id: str, service: ServiceDep) -> SessionInfo:
    """Forget a session's history: zero state, RNG back to its seed."""
    return await service.reset_session(session_id)

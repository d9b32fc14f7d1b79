"""charstream's /v1 HTTP API: one-shot and session generation (JSON or Server-Sent Events), sessions."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import StreamingResponse

from exports import state as portable
from service.api import budget
from service.api.deps import OwnerDep, ServiceDep
from service.api.errors import NATIVE_ERRORS
from service.api.native.schemas import (
    CreateSessionRequest,
    FeedRequest,
    FeedResponse,
    ForkRequest,
    GenerateRequest,
    GenerateResponse,
    ScoreRequest,
    ScoreResponse,
    SessionGenerateRequest,
    SessionInfo,
    StateInfo,
    TextScore,
    Usage,
)
from service.api.sse import SSE_DONE, SSE_HEADERS, STREAMING, sse_frame
from service.core.events import Completed, Failed, TextEvent
from service.core.generation import Generation
from service.core.sampling import SamplingParams
from service.errors import InternalError, InvalidInput
from service.serving import states

router = APIRouter(prefix="/v1", responses=NATIVE_ERRORS)

log = logging.getLogger("charstream.http")


async def sse_frames(generation: Generation, final: Callable[[], dict[str, Any]] | None = None) -> AsyncIterator[bytes]:
    """One `data:` frame per event (text, prompt, the final one with `final`'s fields, or an error), then `[DONE]`."""
    try:
        async for event in generation.stream():
            if isinstance(event, TextEvent) and event.plain:
                # The frame sent most, once per character or few: built without a dict.
                yield f'data: {{"text": {json.dumps(event.text, ensure_ascii=False)}}}\n\n'.encode()
            elif isinstance(event, Completed) and final is not None:
                yield sse_frame({**event.payload(), **final()})
            else:
                yield sse_frame(event.payload())
    except Exception:  # a bug, not a client: the stream still ends with an error and [DONE]
        log.exception("stream failed")
        yield sse_frame(Failed(InternalError("the stream failed on the server")).payload())
    yield SSE_DONE


async def _respond(
    generation: Generation, stream: bool, final: Callable[[], dict[str, Any]] | None = None
) -> GenerateResponse | StreamingResponse:
    """The answer; `final` adds fields to it (to the final frame of a stream) once the generation is done."""
    if stream:
        frames = sse_frames(generation, final)
        return StreamingResponse(frames, media_type="text/event-stream", headers=SSE_HEADERS)
    result = await generation.result()
    done = result.completed
    return GenerateResponse(
        **(final() if final is not None else {}),
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


@router.post("/generate", response_model=GenerateResponse, responses=STREAMING)
async def generate(
    request: GenerateRequest, service: ServiceDep, owner: OwnerDep, http: Request
) -> GenerateResponse | StreamingResponse:
    """Generate text from a prompt (after `state`, if given); `stream: true` answers as Server-Sent Events."""
    params = request.to_sampling_params()
    await budget.admit(http, budget.generation(params, len(request.prompt)))
    start = None
    if request.state is not None or request.return_state:
        if request.session_id is not None:
            field = "state" if request.state is not None else "return_state"
            raise InvalidInput(
                f"{field} and session_id: a session keeps its own state (GET /v1/sessions/{{id}}/state exports it)",
                field=field,
            )
        blob = None if request.state is None else states.from_text(request.state)
        start = service.state_session(blob, request.model, request.seed)
    generation = await service.generate(
        params,
        request.prompt,
        request.model,
        request.seed,
        request.session_id,
        owner,
        start=start,
        keep=request.return_state,
    )
    final = None
    if request.return_state and start is not None:
        kept = start
        final = lambda: {"state": states.to_text(service.export_state(kept))}  # noqa: E731
    return await _respond(generation, request.stream, final)


@router.post("/sessions", response_model=SessionInfo, status_code=status.HTTP_201_CREATED)
async def create_session(
    request: CreateSessionRequest, service: ServiceDep, owner: OwnerDep, http: Request
) -> SessionInfo:
    """Create a session whose state the server keeps, fresh or from a `state`; an optional prompt primes it."""
    await budget.admit(http, budget.reading(len(request.prompt), 0, "prompt"))
    blob = None if request.state is None else states.from_text(request.state)
    return SessionInfo.of(await service.create_session(request.model, request.prompt, request.seed, owner, blob))


@router.get(
    "/sessions/{session_id}/state",
    response_model=StateInfo,
    responses={200: {"content": {portable.MEDIA_TYPE: {}}, "description": "the state, as JSON or its raw bytes"}},
)
async def get_session_state(session_id: str, service: ServiceDep, owner: OwnerDep, http: Request) -> Response:
    """The session's state as a portable charstream-state: JSON with it in base64url, or the raw bytes
    with `Accept: application/octet-stream`."""
    session = await service.get_session(session_id, owner)
    blob = service.export_state(session)
    if portable.MEDIA_TYPE in http.headers.get("accept", ""):
        return Response(blob, media_type=portable.MEDIA_TYPE)
    info = StateInfo(
        format=portable.FORMAT,
        version=portable.VERSION,
        model=session.model,
        position=session.history_chars,
        state=states.to_text(blob),
    )
    return Response(info.model_dump_json(), media_type="application/json")


@router.get("/sessions/{session_id}", response_model=SessionInfo)
async def get_session(session_id: str, service: ServiceDep, owner: OwnerDep) -> SessionInfo:
    """A session's model, history length and expiry."""
    return SessionInfo.of(await service.get_session(session_id, owner))


@router.delete("/sessions/{session_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_session(session_id: str, service: ServiceDep, owner: OwnerDep) -> Response:
    """Delete a session and free its state."""
    await service.delete_session(session_id, owner)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/sessions/{session_id}/generate", response_model=GenerateResponse, responses=STREAMING)
async def session_generate(
    session_id: str, request: SessionGenerateRequest, service: ServiceDep, owner: OwnerDep, http: Request
) -> GenerateResponse | StreamingResponse:
    """Continue a session from its kept state (after an optional prompt) and keep the new state."""
    params = request.to_sampling_params()
    await budget.admit(http, budget.generation(params, len(request.prompt)))
    generation = await service.generate(params, request.prompt, session_id=session_id, owner=owner)
    return await _respond(generation, request.stream)


@router.post("/sessions/{session_id}/feed", response_model=FeedResponse)
async def feed(
    session_id: str, request: FeedRequest, service: ServiceDep, owner: OwnerDep, http: Request
) -> FeedResponse:
    """Advance a session's state over text without generating; with its logprobs or top-g outliers if asked."""
    params = SamplingParams(max_new_chars=0, prompt_logprobs=request.logprobs, prompt_ranks=request.top_g is not None)
    await budget.admit(http, budget.reading(len(request.text), 0, "text"))
    session, chars, read = await service.feed_scored(session_id, request.text, params, owner)
    outside = None
    if request.top_g is not None and read is not None and read.ranks is not None:
        outside = [i for i, rank in enumerate(read.ranks) if rank is not None and rank >= request.top_g]
    return FeedResponse(
        session=SessionInfo.of(session),
        usage=Usage(prompt_chars=chars, generated_chars=0),
        logprobs=read.logprobs if request.logprobs and read is not None else None,
        outside_top_g=outside,
    )


@router.post("/score", response_model=ScoreResponse)
async def score(request: ScoreRequest, service: ServiceDep, http: Request) -> ScoreResponse:
    """Score texts by the model's likelihood: nll, nats and bits per character, per-character logprobs if asked."""
    chars = len(request.context) + sum(len(text) for text in request.texts)  # the context is read once
    await budget.admit(http, budget.reading(chars, request.top_logprobs, "texts, context, top_logprobs"))
    model, read = await service.score(request.texts, request.context, request.model, request.top_logprobs)
    scores = []
    for text in read:
        lps = [lp for lp in text.logprobs or () if lp is not None]  # every character follows the context
        nll = -math.fsum(lps)
        scores.append(
            TextScore(
                nll=nll,
                chars=len(lps),
                nats_per_char=nll / len(lps),
                bits_per_char=nll / len(lps) / math.log(2),
                logprobs=lps if request.logprobs else None,
                top_logprobs=[t for t in text.top_logprobs or () if t is not None] if request.top_logprobs else None,
            )
        )
    return ScoreResponse(model=model, scores=scores)


@router.post("/sessions/{session_id}/fork", response_model=SessionInfo, status_code=status.HTTP_201_CREATED)
async def fork(
    session_id: str, service: ServiceDep, owner: OwnerDep, request: ForkRequest | None = None
) -> SessionInfo:
    """A new session with a copy of this one's state (and RNG, unless a new seed is given)."""
    return SessionInfo.of(await service.fork_session(session_id, request.seed if request else None, owner))


@router.post("/sessions/{session_id}/reset", response_model=SessionInfo)
async def reset(session_id: str, service: ServiceDep, owner: OwnerDep) -> SessionInfo:
    """Forget a session's history: zero state, RNG back to its seed."""
    return SessionInfo.of(await service.reset_session(session_id, owner))

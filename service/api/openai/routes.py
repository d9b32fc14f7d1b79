"""OpenAI-compatible HTTP routes: completions and the models list.

HTTP only: the logic is in completions.py beside this file. Every error on these paths takes OpenAI's
shape (app.py registers errors.py's builder for them), so the `openai` client raises its typed
exceptions.
"""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from service.api import budget
from service.api.deps import OwnerDep, ServiceDep
from service.api.openai.completions import UNIQUE_ATTEMPTS, CompletionServing
from service.api.openai.errors import OPENAI_ERRORS
from service.api.openai.protocol import (
    DEFAULT_MAX_TOKENS,
    CompletionRequest,
    CompletionResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ModelCard,
    ModelList,
)
from service.api.sse import SSE_HEADERS, STREAMING
from service.core import SamplingParams
from service.errors import PermissionDenied

OPENAI_PATHS = ("/v1/completions", "/v1/embeddings", "/v1/models")

router = APIRouter(prefix="/v1", responses=OPENAI_ERRORS, tags=["openai"])


def get_completions(service: ServiceDep) -> CompletionServing:
    return CompletionServing(service)


CompletionsDep = Annotated[CompletionServing, Depends(get_completions)]


def work_of(request: CompletionRequest) -> budget.Work:
    """Each prompt read once, every choice's characters (a unique request's retries too) with their alternatives."""
    attempts = UNIQUE_ATTEMPTS if request.unique else 1
    choices = request.choices_per_prompt * len(request.prompts) * attempts
    prompt_chars = sum(len(p) for p in dict.fromkeys(request.prompts))
    fields = "n, max_tokens, logprobs, prompt" + (", unique" if request.unique else "")
    # Only the fields that make the work: the request's other fields are checked once it is admitted.
    max_tokens = DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
    alternatives = request.logprobs or 0
    shape = SamplingParams(max_new_chars=max_tokens, top_logprobs=alternatives, prompt_logprobs=bool(request.echo))
    return budget.generation(shape, prompt_chars, choices, fields)


@router.post("/completions", response_model=CompletionResponse, responses=STREAMING)
async def create_completion(
    request: CompletionRequest, completions: CompletionsDep, owner: OwnerDep, http: Request
) -> CompletionResponse | StreamingResponse:
    """OpenAI's Completions API (a token is a character); `session_id` continues a server-kept session."""
    await budget.admit(http, work_of(request))
    answer = await completions.create(request, owner)
    if isinstance(answer, CompletionResponse):
        return answer
    return StreamingResponse(answer, media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(request: EmbeddingRequest, service: ServiceDep, http: Request) -> EmbeddingResponse:
    """OpenAI's Embeddings API: each input's vector is the model's top-layer `h` after reading it, unit length."""
    texts = request.texts
    chars = sum(len(t) for t in texts)
    await budget.admit(http, budget.reading(chars, 0, "input"))
    model, vectors = await service.embed(texts, request.model, request.dimensions)
    data = [
        Embedding(
            index=i,
            embedding=base64.b64encode(v.astype("<f4").tobytes()).decode()
            if request.encoding_format == "base64"
            else v.tolist(),
        )
        for i, v in enumerate(vectors)
    ]
    return EmbeddingResponse(data=data, model=model, usage=EmbeddingUsage(prompt_tokens=chars, total_tokens=chars))


@router.get("/models", response_model=ModelList)
async def list_models(service: ServiceDep) -> ModelList:
    """The loaded models, in the OpenAI list shape, with their cell, sizes and training facts."""
    return ModelList(data=[ModelCard(**m.describe()) for m in service.registry.models.values()])


@router.get("/models/{model_id}", response_model=ModelCard)
async def retrieve_model(model_id: str, service: ServiceDep) -> ModelCard:
    """One loaded model, as in the list."""
    return ModelCard(**service.registry.get(model_id).describe())


@router.delete("/models/{model_id}", status_code=204)
async def delete_model(model_id: str, service: ServiceDep) -> None:
    """Refused (403): models are the folders under the models folder, not objects the API can delete."""
    service.registry.get(model_id)  # 404 for a model that does not exist
    raise PermissionDenied(
        f"model {model_id!r} cannot be deleted through the API: the server loads every folder under its "
        "models folder at start-up; remove the folder and restart to retire a model",
        field="model",
    )

"""OpenAI-compatible HTTP routes: completions and the models list.

HTTP only: the logic is in completions.py beside this file. Every error on these paths takes OpenAI's
shape (app.py registers errors.py's builder for them), so the `openai` client raises its typed
exceptions.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from service.api.deps import ServiceDep
from service.api.openai.completions import CompletionServing
from service.api.openai.errors import OPENAI_ERRORS
from service.api.openai.protocol import CompletionRequest, CompletionResponse, ModelCard, ModelList
from service.api.sse import SSE_HEADERS, STREAMING
from service.errors import PermissionDenied

OPENAI_PATHS = ("/v1/completions", "/v1/models")

router = APIRouter(prefix="/v1", responses=OPENAI_ERRORS, tags=["openai"])


def get_completions(service: ServiceDep) -> CompletionServing:
    return CompletionServing(service)


CompletionsDep = Annotated[CompletionServing, Depends(get_completions)]


@router.post("/completions", response_model=CompletionResponse, responses=STREAMING)
async def create_completion(
    request: CompletionRequest, completions: CompletionsDep
) -> CompletionResponse | StreamingResponse:
    """OpenAI's Completions API (a token is a character); `session_id` continues a server-kept session."""
    answer = await completions.create(request)
    if isinstance(answer, CompletionResponse):
        return answer
    return StreamingResponse(answer, media_type="text/event-stream", headers=SSE_HEADERS)


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

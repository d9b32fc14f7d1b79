"""Operator routes under /v1/admin: they need a key with the admin scope (the gate checks it; with no
keys configured they answer 403).

POST /v1/admin/models/{model_id}/reload loads the model's folder again and, if its file changed,
serves the new version without a restart (service/serving/swaps.py says how)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from service.api.errors import ErrorResponse, documented
from service.errors import InvalidInput, NotFound, PermissionDenied, ShuttingDown, Unauthorized
from service.serving.swaps import ModelSwapper

router = APIRouter(prefix="/v1/admin", tags=["admin"])

ADMIN_ERRORS = documented(
    ErrorResponse, (e.status for e in (Unauthorized, PermissionDenied, NotFound, InvalidInput, ShuttingDown))
)


class ReloadResponse(BaseModel):
    id: str
    swapped: bool = Field(description="whether new requests now go to a new version of the file")
    version: str = Field(description="sha256 of the model file serving now")
    previous: str = Field(description="sha256 of the model file that served before")


@router.post("/models/{model_id}/reload", response_model=ReloadResponse, responses=ADMIN_ERRORS)
async def reload_model(model_id: str, request: Request) -> ReloadResponse:
    """Load the model's folder again; a changed file serves new requests, running ones finish on theirs.

    422 if the new version does not load: the previous one keeps serving, and /readyz says why."""
    swapper: ModelSwapper = request.app.state.swapper
    result = await swapper.reload(model_id)
    if result.error is not None:
        raise InvalidInput(
            f"the new version of model {model_id!r} did not load ({result.error}); the previous one still serves",
            field="model_id",
        )
    return ReloadResponse(id=model_id, swapped=result.swapped, version=result.version, previous=result.previous)

"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import ServiceDep
from service.errors import ApiError

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and its event loop answers (and which worker process answered)."""
    return {"status": "ok", "worker": str(os.getpid())}


READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"description": "no model is loaded, or the server is draining", "content": {"application/json": {}}}
}
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition format", "content": {CONTENT_TYPE_LATEST: {}}}
}


@router.get("/readyz", responses=READY_RESPONSES)
async def readyz(service: ServiceDep) -> JSONResponse:
    """Ready when a model is loaded, the session store answers and the server is not draining; says why not."""
    registry = service.registry
    store_error = None
    try:
        await service.store.check()
    except ApiError as exc:
        store_error = exc.message
    ready = registry.ready and not service.draining and store_error is None
    status = "draining" if service.draining else "ready" if ready else "not_ready"
    body = {
        "status": status,
        "models": sorted(registry.models),
        "default_model": registry.default,
        "failed": registry.failures,
        # A new version of a model that did not load (the previous one serves): ready, but said.
        "swap_failed": registry.swap_failures,
        "session_store": {"store": service.store.describe(), "error": store_error},
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, responses=METRICS_RESPONSES)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus metrics: requests, sessions, generated characters, step latency, batch sizes."""
    await service.refresh_metrics()
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

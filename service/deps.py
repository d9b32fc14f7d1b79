"""FastAPI dependencies as Annotated aliases: the service, the settings, the API key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr
from starlette.requests import HTTPConnection

from service.errors import Unauthorized
from service.serving import GenerationService
from service.settings import Settings


def get_service(conn: HTTPConnection) -> GenerationService:
    service: GenerationService = conn.app.state.service
    return service


def get_settings(conn: HTTPConnection) -> Settings:
    settings: Settings = conn.app.state.settings
    return settings


def check_api_key(conn: HTTPConnection) -> None:
    """With CHARSTREAM_API_KEY set, /v1 needs `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    verify_api_key(conn, get_settings(conn).api_key)


def verify_api_key(conn: HTTPConnection, expected: SecretStr | None) -> None:
    """Raise Unauthorized unless the connection carries `expected` (nothing is needed when it is None)."""
    if expected is None:
        return
    auth = conn.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else conn.headers.get("x-api-key")
    if given is None and conn.scope["type"] == "websocket":
        given = conn.query_params.get("api_key")  # browsers cannot set WebSocket headers
    if given is None or not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("missing or wrong API key (Authorization: Bearer KEY or X-API-Key: KEY)")


def require_api_key(request: Request) -> None:
    check_api_key(request)


ServiceDep = Annotated[GenerationService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

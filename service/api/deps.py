"""FastAPI dependencies as Annotated aliases: the service and the settings the app was built with,
and the caller's identity as a session owner."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from service.api.quotas import owner_of
from service.serving.facade import GenerationService
from service.sessions.store import Owner
from service.settings import Settings


def get_service(conn: HTTPConnection) -> GenerationService:
    service: GenerationService = conn.app.state.service
    return service


def get_settings(conn: HTTPConnection) -> Settings:
    settings: Settings = conn.app.state.settings
    return settings


ServiceDep = Annotated[GenerationService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
OwnerDep = Annotated[Owner, Depends(owner_of)]

"""The compose files, read as compose reads them (variables interpolated): images tagged with the
project's version, every Redis server and sentinel behind REDIS_PASSWORD (compose refuses to
start without it), charstream connecting with it, the API key kept on the `state` volume, and
every CHARSTREAM_* value one the service accepts. tests/container runs compose.yaml and
compose.scale.yaml for real."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from service.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILES = sorted(REPO.glob("compose*.yaml"))
WITH_REDIS = ["compose.scale.yaml", "compose.scale-sentinel.yaml"]
PASSWORD = "0123456789abcdef" * 2
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<named>\w+))")


class Unset(Exception):
    """A ${NAME:?message} whose variable is unset: compose stops with the message."""


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation: $$, $NAME, ${NAME}, ${NAME:-default} and ${NAME:?message}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        found = env.get(name)
        empty = found is None or (found == "" and (m["op"] or "").startswith(":"))
        if m["op"] and m["op"].endswith("?") and empty:
            raise Unset(m["arg"])
        if m["op"] and m["op"].endswith("-") and empty:
            return str(m["arg"])
        return found or ""

    return VARIABLE.sub(one, value)


def compose(name: str, **env: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / name).read_text())
    return dict(interpolate(loaded, env))


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", [])
    return command if isinstance(command, str) else " ".join(command)


def _charstream(project: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in project["services"].values() if s.get("build", {}).get("target") == "serve"]


def test_there_are_compose_files() -> None:
    assert {p.name for p in COMPOSE_FILES} >= {"compose.yaml", *WITH_REDIS}


@pytest.mark.parametrize("name", WITH_REDIS)
def test_redis_deployments_refuse_to_start_without_a_password(name: str) -> None:
    with pytest.raises(Unset, match=r"set REDIS_PASSWORD in \.env"):
        compose(name)
    with pytest.raises(Unset, match=r"set REDIS_PASSWORD in \.env"):
        compose(name, REDIS_PASSWORD="")


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_images_are_tagged_by_version(path: Path) -> None:
    project = compose(path.name, REDIS_PASSWORD=PASSWORD)
    for service in project["services"].values():
        image = service["image"]
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, image
        if name.startswith("charstream"):
            assert tag == VERSION, image


@pytest.mark.parametrize("name", WITH_REDIS)
def test_every_redis_needs_the_password_and_charstream_sends_it(name: str) -> None:
    project = compose(name, REDIS_PASSWORD=PASSWORD)
    servers = sentinels = 0
    for service_name, service in project["services"].items():
        if not service["image"].startswith("redis:"):
            continue
        command = _command(service)
        assert "protected-mode" not in command, service_name
        if "--sentinel" in command:
            sentinels += 1
            assert service["environment"]["REDIS_PASSWORD"] == PASSWORD
            assert 'sentinel auth-pass charstream $REDIS_PASSWORD" "requirepass $REDIS_PASSWORD"' in command
            continue
        servers += 1
        assert f"--requirepass {PASSWORD}" in command, service_name
        if name == "compose.scale-sentinel.yaml":  # any server may become a replica after a failover
            assert f"--masterauth {PASSWORD}" in command, service_name
        assert service["environment"]["REDISCLI_AUTH"] == PASSWORD  # redis-cli in the healthcheck
    assert servers >= 1 and sentinels in (0, 3)
    for service in _charstream(project):
        store = service["environment"]["CHARSTREAM_SESSION_STORE"]
        assert store.startswith(("redis://:", "redis+sentinel://:")) and f":{PASSWORD}@" in store


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_charstream_keeps_its_api_key_on_the_state_volume(path: Path) -> None:
    project = compose(path.name, REDIS_PASSWORD=PASSWORD)
    for service in _charstream(project):
        assert service["environment"]["CHARSTREAM_API_KEY_FILE"] == "/state/api-key"
        assert "state:/state" in service["volumes"]
        assert "state" in project["volumes"]


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_setting_is_one_charstream_reads(path: Path) -> None:
    project = compose(path.name, REDIS_PASSWORD=PASSWORD)
    for service in _charstream(project):
        overrides = {}
        for name, value in service["environment"].items():
            field = name.removeprefix("CHARSTREAM_").lower()
            assert name.startswith("CHARSTREAM_") and field in Settings.model_fields, name
            overrides[field] = value
        load_settings(**overrides)

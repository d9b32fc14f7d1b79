"""API keys: who may call what, and how much.

A key has a name (the owner of the sessions it creates, and the label of its limits), scopes and
quotas. Keys come from three places, all optional, read once at start-up:

- `CHARSTREAM_KEYS_FILE`: a TOML file (a mounted Secret in Kubernetes) of named keys, e.g.

      [keys.alice]
      key_sha256 = "9f86d0..."        # or key = "..." (the secret itself)
      scopes = ["generate", "score", "sessions"]
      requests_per_s = 5              # each quota is optional
      chars_per_s = 2000
      max_sessions = 100

- `CHARSTREAM_API_KEY`: one key named `default` with every user scope (no admin, no metrics);
- `CHARSTREAM_ADMIN_KEY`: one key named `admin` with the admin and metrics scopes.

Only SHA-256 digests are kept in memory, and a presented key is looked up by its digest, so the
lookup's time does not depend on how much of a key an attacker has guessed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import ServiceConfigError
from service.settings import Settings

ScopeName = Literal["generate", "score", "sessions", "admin", "metrics"]
USER_SCOPES: frozenset[str] = frozenset({"generate", "score", "sessions"})
ALL_SCOPES: frozenset[str] = USER_SCOPES | {"admin", "metrics"}


@dataclass(frozen=True)
class Quota:
    """Per-key limits; None is unlimited."""

    requests_per_s: float | None = None
    chars_per_s: float | None = None
    max_sessions: int | None = None


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes
    scopes: frozenset[str]
    quota: Quota = Quota()

    def allows(self, scope: str) -> bool:
        return scope in self.scopes


def _user_scopes() -> list[ScopeName]:
    return ["generate", "score", "sessions"]


class KeyEntry(BaseModel):
    """One `[keys.NAME]` table of the keys file."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(default=None, min_length=16, description="the secret itself")
    key_sha256: str | None = Field(default=None, pattern="^[0-9a-f]{64}$", description="hex SHA-256 of the secret")
    scopes: list[ScopeName] = Field(default_factory=_user_scopes)
    requests_per_s: float | None = Field(default=None, gt=0)
    chars_per_s: float | None = Field(default=None, gt=0)
    max_sessions: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_secret(self) -> KeyEntry:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        return self

    def digest(self) -> bytes:
        if self.key_sha256 is not None:
            return bytes.fromhex(self.key_sha256)
        assert self.key is not None
        return digest(self.key)


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Keyring:
    """Every configured key, found by the secret a request presents."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = tuple(keys)
        self._by_digest = {k.digest: k for k in self.keys}
        if len(self._by_digest) != len(self.keys):
            raise ServiceConfigError("two API keys have the same secret: give each its own")

    @property
    def enabled(self) -> bool:
        """Whether requests need a key at all."""
        return bool(self.keys)

    def find(self, secret: str) -> ApiKey | None:
        found = self._by_digest.get(digest(secret))
        # The dict lookup hashes the digest, not the secret; compare once more in constant time so
        # that a lookup which found something costs what one which found nothing does.
        if found is not None and hmac.compare_digest(found.digest, digest(secret)):
            return found
        return None


def read_keys_file(path: Path) -> list[ApiKey]:
    """The keys of a TOML keys file; a bad file stops the start with one line naming the key and field."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ServiceConfigError(f"CHARSTREAM_KEYS_FILE: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ServiceConfigError(f"CHARSTREAM_KEYS_FILE: {path} is not TOML: {exc}") from None
    unknown = set(data) - {"keys"}
    if unknown or not isinstance(data.get("keys"), dict):
        raise ServiceConfigError(f"CHARSTREAM_KEYS_FILE: {path} needs [keys.NAME] tables and nothing else")
    keys = []
    for name, table in data["keys"].items():
        try:
            entry = KeyEntry.model_validate(table)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            field = f".{where}" if where else ""
            message = str(err["msg"]).removeprefix("Value error, ")
            raise ServiceConfigError(f"CHARSTREAM_KEYS_FILE: keys.{name}{field}: {message}") from None
        quota = Quota(entry.requests_per_s, entry.chars_per_s, entry.max_sessions)
        keys.append(ApiKey(name, entry.digest(), frozenset(entry.scopes), quota))
    return keys


def load_keyring(settings: Settings, create_key: bool = False) -> Keyring:
    """Every key the settings name; `create_key` makes the key file's key when there is none yet."""
    keys = read_keys_file(settings.keys_file) if settings.keys_file is not None else []
    names = {k.name for k in keys}
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    if api_key is None and settings.api_key_file is not None:
        api_key = key_from_file(settings.api_key_file, create=create_key)
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key is not None else None
    for name, secret, scopes, variable in (
        ("default", api_key, USER_SCOPES, "CHARSTREAM_API_KEY"),
        ("admin", admin_key, frozenset({"admin", "metrics"}), "CHARSTREAM_ADMIN_KEY"),
    ):
        if secret is None:
            continue
        if name in names:
            raise ServiceConfigError(f"CHARSTREAM_KEYS_FILE: the name {name!r} is taken by {variable}")
        keys.append(ApiKey(name, digest(secret), scopes))
    return Keyring(keys)


def key_from_file(path: Path, create: bool) -> str:
    """The key kept in `path`; with `create`, a missing file gets a new random key, said once on stderr.

    This is the one-command start of a container (as Jupyter's token): the first start makes the
    key and prints it, later starts read the same one from the volume.
    """
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        if not create:
            raise ServiceConfigError(f"CHARSTREAM_API_KEY_FILE: {path} does not exist") from None
        key = secrets.token_urlsafe(32)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
                out.write(key + "\n")
        except OSError as exc:
            raise ServiceConfigError(f"CHARSTREAM_API_KEY_FILE: cannot write {path}: {exc.strerror}") from None
        print(f"charstream: made an API key, kept in {path}:\n    {key}", file=sys.stderr, flush=True)
        return key
    except OSError as exc:
        raise ServiceConfigError(f"CHARSTREAM_API_KEY_FILE: cannot read {path}: {exc.strerror}") from None
    if len(key) < 16:
        raise ServiceConfigError(f"CHARSTREAM_API_KEY_FILE: the key in {path} is shorter than 16 characters")
    return key

"""Settings read once from the environment (prefix CHARSTREAM_), e.g. CHARSTREAM_PORT=9000."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.errors import ServiceConfigError

SECRET_SETTINGS = ("api_key", "admin_key", "state_key", "session_store")  # never echoed: a key, a URL with a password
# How long a thread may hold the GIL while another waits for it, set at start-up. Python's default
# lets the event loop keep it through a whole step's worth of sends after onnxruntime returns,
# so the step thread idles instead of starting the next step (docs/performance.md measures both).
SWITCH_INTERVAL_US = 100
# Characters a stream collects before it is woken to send a frame (vLLM's stream_interval). Two
# halves the frames, the cost that bounds one process, for one step of latency per frame; frames of
# one keep the gap between characters smallest (docs/performance.md has both measured).
STREAM_INTERVAL = 2
# The event loop the server runs on. uvloop does less work per event, but writes to a socket while
# holding the GIL; asyncio's own loop releases it for each send, so the step thread samples and
# steps while the loop sends. At 64 streams the sends are most of the loop's time, and asyncio's
# loop delivered more characters a second (docs/performance.md measures both).
EVENT_LOOP: Literal["asyncio", "uvloop"] = "asyncio"
# Prompt positions read per scheduler iteration. A seq=T call costs about T times a one-character
# step, so this bounds how long other streams wait for their next character while a long prompt
# is read, against reading faster than stepping (benchmarks/prefill_fairness.py measures both; the
# performance docs keep the numbers).
PREFILL_CHUNK = 256
# While streams decode, reading prompts gets at most this share of the step thread: a long prompt
# (or a /v1/score of many texts) then slows each stream by a bounded factor rather than by a
# chunk's time for every character, and reads at least this share of its own speed.
PREFILL_SHARE = 0.5

# -- session store URLs: checked here, so that a bad one stops the start with one line -------------
# The redis+sentinel:// URL names where the sentinels are and which primary they watch:
#     redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/DB]
# The sentinels answer which server is the primary of SERVICE right now; the store connects to it
# and asks again after a failover. The URL's user and password are both the sentinels' and the
# data servers' (primary and replicas): deployments give them the same one.
SENTINEL_SCHEME = "redis+sentinel://"
SENTINEL_URL_FORM = "redis+sentinel://host:port[,host:port...]/SERVICE[/DB]"


@dataclass(frozen=True)
class SentinelAddress:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None

    def describe(self) -> str:
        """The URL again, without its password (for logs and errors)."""
        auth = f"{self.username or ''}:***@" if self.password is not None else ""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"{SENTINEL_SCHEME}{auth}{hosts}/{self.service}/{self.db}"


def parse_sentinel_url(url: str) -> SentinelAddress:
    """The URL's parts; ValueError with one line saying what is wrong and the expected form."""
    if not url.startswith(SENTINEL_SCHEME):
        raise ValueError(f"a sentinel URL starts with {SENTINEL_SCHEME}")
    rest = url.removeprefix(SENTINEL_SCHEME)
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        user, sep, secret = auth.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    sentinels = tuple(_host_port(item) for item in netloc.split(","))
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError(f"name the primary's service after the sentinels: {SENTINEL_URL_FORM}")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError(f"the database after the service must be a number, not {parts[1]!r}")
        db = int(parts[1])
    return SentinelAddress(sentinels, unquote(parts[0]), db, username, password)


def _host_port(item: str) -> tuple[str, int]:
    host, sep, port = item.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"each sentinel is host:port, not {item!r}: {SENTINEL_URL_FORM}")
    return host.strip("[]"), int(port)


REDIS_SCHEMES = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME)
# A budget in bytes, not states: a state is layers x hidden x 2 floats (an LSTM's), so this holds
# thousands of chunk boundaries of the bundled model's prompt prefixes.
PROMPT_CACHE_BYTES = 64 * 2**20
WS_ENVELOPE_BYTES = 16_384  # a WebSocket message's fields besides its prompt


def bundled_models_dir() -> Path:
    """The `exports/` folder that ships with charstream and holds the default model."""
    import exports

    return Path(exports.__file__).resolve().parent


def _default_threads() -> int:
    # Leave one core to the event loop, which samples, frames and sends while a step runs.
    return max(1, (os.cpu_count() or 2) - 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHARSTREAM_", extra="ignore", frozen=True)

    models_dir: Path = Field(default_factory=bundled_models_dir, description="folder of exported models")
    default_model: str | None = Field(default=None, description="model used when a request names none")
    variant: Literal["fp32", "int8", "fp16"] = Field(default="fp32", description="which file of each model to load")
    host: str = Field(default="127.0.0.1", description="address to listen on (the image sets 0.0.0.0)")
    port: int = Field(default=8000, ge=0, le=65535, description="0 picks a free port")
    session_ttl_s: float = Field(default=900.0, gt=0, description="idle sessions expire after this")
    max_sessions: int = Field(default=10_000, ge=1, description="sessions held at most (across replicas for Redis)")
    session_store: str = Field(
        default="memory",
        description="where sessions live: memory (this process), a redis://, rediss:// or unix:// URL, or "
        "redis+sentinel://host:port[,host:port...]/SERVICE[/DB]",
    )
    model_poll_s: float = Field(
        default=2.0, ge=0, le=3600, description="how often a changed model file is noticed and swapped in; 0: never"
    )
    redis_prefix: str = Field(
        default="charstream",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="the start of every Redis key charstream writes (sessions, limits, shared prompt states): "
        "deployments sharing one Redis use different ones",
    )
    redis_wait_replicas: int = Field(
        default=0, ge=0, le=16, description="each session write waits until this many Redis replicas confirm it"
    )
    lease_ttl_s: float = Field(
        default=10.0, gt=0, le=3600, description="a session's lease outlives a crashed holder by at most this"
    )
    workers: int = Field(default=1, ge=1, le=256, description="server processes sharing the port")
    max_connections: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="open /v1 requests and WebSockets per process; past it HTTP gets 429, a WebSocket close 1013",
    )
    reuse_port: bool = Field(default=False, description="bind with SO_REUSEPORT (set for each worker)")
    max_prompt_chars: int = Field(default=100_000, ge=1, description="longer prompts or feeds answer 413")
    max_new_chars: int = Field(default=4096, ge=1, description="a larger max_new_chars (max_tokens) is refused")
    ort_threads: int = Field(default_factory=_default_threads, ge=1, description="onnxruntime intra-op threads")
    batching: bool = Field(default=True, description="share one onnxruntime step across sessions")
    max_batch_size: int = Field(default=256, ge=1, description="rows per onnxruntime call at most")
    max_wait_us: int = Field(default=500, ge=0, description="an idle scheduler waits this long for company")
    stream_interval: int = Field(
        default=STREAM_INTERVAL, ge=1, le=64, description="a stream sends a frame once this many characters wait"
    )
    event_loop: Literal["asyncio", "uvloop"] = Field(
        default=EVENT_LOOP, description="the server's event loop: asyncio's own or uvloop (docs/performance.md)"
    )
    switch_interval_us: int = Field(
        default=SWITCH_INTERVAL_US, ge=10, le=100_000, description="longest GIL hold while another thread waits"
    )
    prefill_chunk: int = Field(
        default=PREFILL_CHUNK, ge=1, le=10_000_000, description="prompt positions read between two decode steps"
    )
    max_rows_per_request: int = Field(
        default=64,
        ge=1,
        description="a request's choices (completions' n) running at once; the rest start as those end",
    )
    prefill_share: float = Field(
        default=PREFILL_SHARE,
        gt=0.0,
        le=1.0,
        description="the most of the step thread's time reading prompts may take while streams decode; 1 = a "
        "chunk between every two steps",
    )
    prompt_cache_bytes: int = Field(
        default=PROMPT_CACHE_BYTES,
        ge=0,
        le=2**40,
        description="bytes of prompt-prefix states kept per process for stateless requests; 0 turns the cache off",
    )
    prompt_cache_shared: bool = Field(
        default=False,
        description="with a Redis session store, prompt-prefix states are kept there too, for every worker and "
        "replica (expiring after the session TTL)",
    )
    shutdown_grace_s: float = Field(
        default=10.0, ge=0, le=3600, description="on SIGTERM, running generations get this long to finish"
    )
    api_key: SecretStr | None = Field(
        default=None, description="a key with every user scope (generate, score, sessions); /v1 then needs a key"
    )
    api_key_file: Path | None = Field(
        default=None,
        description="read CHARSTREAM_API_KEY from this file; `charstream serve` makes and prints one if it is missing",
    )
    admin_key: SecretStr | None = Field(default=None, description="a key with the admin and metrics scopes")
    state_key: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="exported states are HMAC-signed under it, and only states signed under it are imported",
    )
    keys_file: Path | None = Field(default=None, description="a TOML file of named keys with scopes and quotas")
    allow_unauthenticated: bool = Field(
        default=False, description="serve without any key on an address other than loopback (anyone may call)"
    )
    allowed_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="browser origins a WebSocket may come from besides the server's own (comma-separated; * for any)",
    )
    requests_per_s: float | None = Field(
        default=None, gt=0, description="requests a second per key (per client address without keys) unless its own"
    )
    chars_per_s: float | None = Field(
        default=None, gt=0, description="characters a second (read and written) per key or client address"
    )
    max_sessions_per_key: int | None = Field(
        default=None, ge=0, description="sessions one key may hold at once unless its own (without keys: max_sessions)"
    )
    max_request_work: int = Field(
        default=2_000_000,
        ge=1,
        description="characters one request may read and write in all, each alternative returned with a character "
        "(logprobs) counted as one more; more answers 413 before any work starts",
    )
    metrics_need_key: bool = Field(default=False, description="/metrics needs a key with the metrics scope")
    docs: bool = Field(default=True, description="serve /docs, /redoc and /openapi.json")
    max_body_bytes: int = Field(
        default=8 * 2**20, ge=1024, le=2**31, description="a larger request body answers 413 before it is read"
    )
    require_models: bool = Field(default=False, description="exit at start-up unless every model loads")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="the log's threshold")
    log_json: bool = Field(default=True, description="one JSON object per log line")

    @field_validator("session_store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value != "memory" and not value.startswith(REDIS_SCHEMES):
            raise ValueError(f"use memory or a URL starting with {', '.join(REDIS_SCHEMES)}")
        if value.startswith(SENTINEL_SCHEME):
            parse_sentinel_url(value)  # a ValueError says what is wrong with it
        return value

    @model_validator(mode="after")
    def _workers_share_sessions(self) -> Settings:
        # Each worker has its own memory: a session made through one would be unknown to the others.
        if self.workers > 1 and self.port == 0:
            raise ValueError(f"CHARSTREAM_WORKERS={self.workers} needs a fixed CHARSTREAM_PORT, not 0")
        if self.redis_wait_replicas and self.session_store == "memory":
            raise ValueError(
                f"CHARSTREAM_REDIS_WAIT_REPLICAS={self.redis_wait_replicas} needs a Redis session store "
                "(CHARSTREAM_SESSION_STORE=redis://... or redis+sentinel://...)"
            )
        if self.prompt_cache_shared and self.session_store == "memory":
            raise ValueError(
                "CHARSTREAM_PROMPT_CACHE_SHARED needs a Redis session store (CHARSTREAM_SESSION_STORE=redis://...)"
            )
        if self.workers > 1 and self.session_store == "memory":
            raise ValueError(
                f"CHARSTREAM_WORKERS={self.workers} needs a shared session store: "
                "set CHARSTREAM_SESSION_STORE=redis://... (each worker's memory is its own)"
            )
        return self

    @property
    def max_ws_message_bytes(self) -> int:
        """The longest WebSocket message read (uvicorn's ws_max_size too): a prompt of
        max_prompt_chars characters, each up to 6 bytes as a JSON escape, and the other fields."""
        return WS_ENVELOPE_BYTES + 6 * self.max_prompt_chars

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origins_list(cls, value: object) -> object:
        # An environment variable is one string: a comma-separated list.
        if isinstance(value, str):
            return tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
        return value

    @field_validator("api_key", "admin_key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty key would make an empty header a valid credential: refuse to start instead.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty; unset it to serve without a key")
        return value


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment; a bad value fails with one line naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err["loc"]:  # a rule between settings: its message names them
            raise ServiceConfigError(str(err["msg"]).removeprefix("Value error, ")) from None
        field = str(err["loc"][0])
        given = "" if field in SECRET_SETTINGS else f" (got {err.get('input')!r})"
        raise ServiceConfigError(f"CHARSTREAM_{field.upper()}: {err['msg']}{given}") from None

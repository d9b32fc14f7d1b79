"""The `redis+sentinel://` URL: where the sentinels are and which primary they watch.

    redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/DB]

The sentinels answer which server is the primary of SERVICE right now; the store connects to it
and asks again after a failover. A password is the data servers' (primary and replicas), not the
sentinels'. Parsing needs no redis-py, so the settings can check the URL at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

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

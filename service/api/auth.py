"""Who is calling: the key a connection presents, the scope its route needs, and the WebSocket's
Origin.

HTTP clients send `Authorization: Bearer KEY` or `X-API-Key: KEY`. Browsers cannot set headers on
a WebSocket, so it also takes the key as a subprotocol: `new WebSocket(url, ["charstream",
"charstream.key." + key])`, answered with the `charstream` subprotocol. Never in the query string,
which proxies write to their access logs.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from service.api.keys import ApiKey, Keyring
from service.errors import PermissionDenied, Unauthorized

WS_PROTOCOL = "charstream"
WS_KEY_PREFIX = "charstream.key."
KEY_HINT = "Authorization: Bearer KEY or X-API-Key: KEY"

# The scope each family of /v1 routes needs (the first prefix that matches). Routes not listed
# (the model list, a model's files and cells) need a valid key and no particular scope.
ROUTE_SCOPES: tuple[tuple[str, str], ...] = (
    ("/v1/admin", "admin"),
    ("/v1/score", "score"),
    ("/v1/embeddings", "score"),
    ("/v1/sessions", "sessions"),
    ("/v1/stream", "generate"),
    ("/v1/generate", "generate"),
    ("/v1/completions", "generate"),
)


def required_scope(path: str) -> str | None:
    for prefix, scope in ROUTE_SCOPES:
        if path == prefix or path.startswith(prefix + "/"):
            return scope
    return None


def presented_key(conn: HTTPConnection) -> str | None:
    auth = conn.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    if "x-api-key" in conn.headers:
        return conn.headers["x-api-key"]
    if conn.scope["type"] == "websocket":
        for protocol in conn.scope.get("subprotocols", []):
            if isinstance(protocol, str) and protocol.startswith(WS_KEY_PREFIX):
                return protocol[len(WS_KEY_PREFIX) :]
    return None


def authenticate(conn: HTTPConnection, keyring: Keyring, scope: str | None) -> ApiKey | None:
    """The caller's key, checked for `scope`; None when the server has no keys (anyone may call).

    Raises Unauthorized (401) for a missing or unknown key and PermissionDenied (403) for a key
    without the scope.
    """
    if conn.scope["type"] == "websocket" and "api_key" in conn.query_params:
        raise Unauthorized(
            f"send the key as the WebSocket subprotocol {WS_KEY_PREFIX}KEY (next to {WS_PROTOCOL!r}) or a header, "
            "not in the query string, which proxies log"
        )
    if not keyring.enabled:
        if scope == "admin":
            raise PermissionDenied("admin routes need a key with the admin scope (CHARSTREAM_ADMIN_KEY)")
        return None
    given = presented_key(conn)
    key = keyring.find(given) if given else None
    if key is None:
        raise Unauthorized(f"missing or wrong API key ({KEY_HINT})")
    if scope is not None and not key.allows(scope):
        raise PermissionDenied(f"the key {key.name!r} lacks the {scope!r} scope this route needs")
    return key


def origin_allowed(conn: HTTPConnection, allowed: tuple[str, ...]) -> bool:
    """Whether a WebSocket's Origin may open it: the server's own origin, a listed one, or none at all.

    A browser always sends Origin, so a page of another site cannot ride on a visitor's network
    position; clients that are not browsers send none and are judged by their key alone.
    """
    origin = conn.headers.get("origin")
    if origin is None or "*" in allowed:
        return True
    origin = origin.rstrip("/")
    if origin in allowed:
        return True
    host = conn.headers.get("host")
    return host is not None and urlsplit(origin).netloc == host

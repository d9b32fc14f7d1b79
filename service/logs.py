"""Structured logs: one JSON object per line, with any `extra={...}` fields carried along."""

from __future__ import annotations

import json
import logging
import logging.config
import re
from typing import Any

# Query parameters whose values are secrets (an old client may still put the WebSocket key in the URL).
SECRET_PARAMS = re.compile(r"((?:api_key|apikey|key|token|access_token)=)[^&\s\"']*", re.IGNORECASE)
# Request headers that carry a key, as uvicorn's and websockets' debug lines print them ("< name: value").
SECRET_HEADERS = re.compile(r"((?:authorization|x-api-key|cookie|proxy-authorization):\s*).*", re.IGNORECASE)
# The WebSocket key rides in a subprotocol (charstream.key.KEY), which the handshake's debug lines print.
SECRET_SUBPROTOCOL = re.compile(r"(charstream\.key\.)[^,\s\"']*")
# A session id is a bearer of the session's state: it stays out of the access log, as nginx's leaves it out.
SESSION_PATH = re.compile(r"(/v1/sessions/)[^/?\s\"']+")

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def redact(text: str) -> str:
    text = SECRET_PARAMS.sub(r"\1[redacted]", text)
    text = SECRET_HEADERS.sub(r"\1[redacted]", text)
    text = SECRET_SUBPROTOCOL.sub(r"\1[redacted]", text)
    return SESSION_PATH.sub(r"\1[id]", text)


class RedactSecrets(logging.Filter):
    """Blanks keys and session ids in every line before it is written.

    The line is formatted first, then redacted: a header's name and its value arrive as two separate
    arguments ("< %s: %s"), so only the whole line shows which value is a secret.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: keep what there is, redacted
            message = str(record.msg)
        record.msg, record.args = redact(message), ()
        return True


def log_config(level: str = "info", json_lines: bool = True) -> dict[str, Any]:
    """A dictConfig for charstream and uvicorn alike (uvicorn.run takes it as log_config)."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if json_lines else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "default",
        "stream": "ext://sys.stderr",
        "filters": ["redact"],
    }
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"redact": {"()": RedactSecrets}},
        "handlers": {"default": handler},
        "loggers": {
            "charstream": {"handlers": ["default"], "level": lvl, "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": lvl, "propagate": False},
            "uvicorn.access": {"handlers": ["default"], "level": lvl, "propagate": False},
        },
    }


def configure(level: str = "info", json_lines: bool = True) -> None:
    logging.config.dictConfig(log_config(level, json_lines))

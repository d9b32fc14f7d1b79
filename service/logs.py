"""Structured logs: one JSON object per line, with any `extra={...}` fields carried along."""

from __future__ import annotations

import json
import logging
import logging.config
import re
from typing import Any

# Query parameters whose values are secrets (browsers send the WebSocket API key in the URL).
SECRET_PARAMS = re.compile(r"((?:api_key|apikey|key|token|access_token)=)[^&\s\"']*", re.IGNORECASE)

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
    return SECRET_PARAMS.sub(r"\1[redacted]", text)


class RedactSecrets(logging.Filter):
    """Blanks secret query parameters in uvicorn's access and WebSocket lines before they are written."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
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

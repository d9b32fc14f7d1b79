"""Server-Sent Events framing shared by the native and OpenAI streams."""

from __future__ import annotations

import json

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = b"data: [DONE]\n\n"
# The generate routes answer JSON, or Server-Sent Events with `stream: true`: both documented.
STREAMING: dict[int | str, dict[str, object]] = {
    200: {
        "description": "the generation (JSON), or with `stream: true` its events (Server-Sent Events)",
        "content": {"text/event-stream": {}},
    }
}


def sse_frame(payload: object) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

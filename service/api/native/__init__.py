"""charstream's own API: /v1/generate, /v1/sessions (JSON or SSE), /v1/models and the WebSocket."""

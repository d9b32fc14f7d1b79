"""HTTP, SSE and WebSocket: the app, its middleware, error responses and one folder per API family.

`app` assembles the FastAPI application (lifespan and routers); `middleware` is the API-key gate
and request metrics every HTTP request meets first; `errors` builds every error body and lists the
statuses each route documents; `sse` frames Server-Sent Events; `limits` writes the models' limits
into the OpenAPI schema; `structured` is the structured-outputs schema both API families take;
`ops` is health, readiness and metrics. `native/` is charstream's own API, `openai/` the
OpenAI-compatible one, `playground/` the web page. Routers never import one another; what they
share lives here.
"""

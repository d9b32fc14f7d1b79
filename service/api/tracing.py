"""OpenTelemetry tracing, off unless the standard OTEL_* variables turn it on.

On when `OTEL_TRACES_EXPORTER` names an exporter (`console`, or `otlp` with an OTLP exporter
package installed) or an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: `otlp` is then the default); `OTEL_SDK_DISABLED=true` turns
it off again. The resource comes from `OTEL_SERVICE_NAME` (default `charstream`) and
`OTEL_RESOURCE_ATTRIBUTES`, batching from `OTEL_BSP_*`, sampling from `OTEL_TRACES_SAMPLER`,
all read by the SDK itself. FastAPI's instrumentation makes one span per request (continuing a
`traceparent` a proxy sent), its URL attributes without session ids or keys; the generation
service adds the model, whether a session ran, and the scheduler's phases as events
(service/serving/spans.py). Probes and /metrics are not traced.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from opentelemetry.trace import Span

from service.errors import ServiceConfigError
from service.logs import redact

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("charstream.tracing")

UNTRACED_URLS = "/healthz,/readyz,/metrics"


def exporters_named(env: Mapping[str, str]) -> list[str]:
    """The trace exporters the environment asks for; none when tracing is off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if not named and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        named = "otlp"
    return [name for name in (part.strip().lower() for part in named.split(",")) if name and name != "none"]


def instrument(app: FastAPI, env: Mapping[str, str] | None = None) -> None:
    """Trace `app`'s requests if the environment says so; the provider is `app.state.tracer_provider`."""
    names = exporters_named(os.environ if env is None else env)
    app.state.tracer_provider = None
    if not names:
        return
    # Imported only when on: a server without tracing never loads the SDK.
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "charstream")})
    provider = TracerProvider(resource=resource)
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=provider,
        excluded_urls=os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", UNTRACED_URLS),
        exclude_spans=["receive", "send"],  # a span per SSE frame would drown the request's own
        server_request_hook=_without_secrets,
    )
    app.state.tracer_provider = provider
    log.info("tracing on", extra={"exporters": ",".join(names)})


def _without_secrets(span: Span, scope: dict[str, Any]) -> None:
    """The request's URL attributes with session ids (in paths) and keys (in query strings) blanked,
    as the logs have them: a trace backend is read by more people than hold the keys."""
    attributes = getattr(span, "attributes", None) or {}
    for name, value in list(attributes.items()):
        if isinstance(value, str) and (cleaned := redact(value)) != value:
            span.set_attribute(name, cleaned)


def _exporter(name: str) -> SpanExporter:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL"))
        try:
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            package = "opentelemetry-exporter-otlp-proto-" + ("grpc" if protocol == "grpc" else "http")
            raise ServiceConfigError(f"OTEL_TRACES_EXPORTER=otlp needs the package {package}: pip install it") from None
        exporter: SpanExporter = OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_* itself
        return exporter
    raise ServiceConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}; use console, otlp or none")


def shutdown(app: FastAPI) -> None:
    """Send the spans still batched (at the end of the lifespan)."""
    provider = getattr(app.state, "tracer_provider", None)
    if provider is not None:
        provider.shutdown()

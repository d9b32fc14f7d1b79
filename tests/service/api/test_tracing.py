"""OpenTelemetry tracing on a real server, read back through the SDK's in-memory exporter: off
unless OTEL_* variables turn it on; one span per request carrying the session id, the model and
the scheduler's phases as events in order; a proxy's traceparent continued; probes untraced; and
a trace followed from a client through nginx into a replica process."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.api.tracing import exporters_named
from service.errors import ServiceConfigError
from tests.nginx_server import NginxServer
from tests.utils import free_port, run_server, serve_process

MODEL = "tiny-lstm"
PHASES = ["charstream.submitted", "charstream.admitted", "charstream.first_char", "charstream.finished"]


def test_tracing_is_off_unless_otel_variables_turn_it_on() -> None:
    assert exporters_named({}) == []
    assert exporters_named({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert exporters_named({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert exporters_named({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == ["otlp"]
    assert exporters_named({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) == []


def test_an_unknown_exporter_stops_the_start(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaeger-thrift")
    with pytest.raises(ServiceConfigError, match="unknown exporter 'jaeger-thrift'"), run_server(models_dir=models_dir):
        pass


def spans_named(exporter: InMemorySpanExporter, name: str, count: int) -> list[ReadableSpan]:
    """The finished spans called `name`, once `count` of them ended (a span ends after its response)."""
    deadline = time.monotonic() + 10
    while True:
        found = [s for s in exporter.get_finished_spans() if s.name == name]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_a_span_per_request_with_session_model_and_phases(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    exporter = InMemorySpanExporter()
    with run_server(models_dir=models_dir, default_model=MODEL) as server, server.client() as c:
        provider = server.app.state.tracer_provider  # type: ignore[attr-defined]
        assert provider is not None
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        assert c.get("/healthz").status_code == 200
        sid = c.post("/v1/sessions", json={"prompt": "ROMEO:"}).json()["id"]
        r = c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 20})
        assert r.status_code == 200, r.text
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        streamed = c.post(
            "/v1/generate",
            json={"prompt": "JULIET:", "max_new_chars": 30, "stream": True},
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},  # as a proxy in front sends it
        )
        assert streamed.status_code == 200
        (session_span,) = spans_named(exporter, "POST /v1/sessions/{session_id}/generate", 1)
        (stream_span,) = spans_named(exporter, "POST /v1/generate", 1)
    assert not [s for s in exporter.get_finished_spans() if "healthz" in s.name]
    assert session_span.attributes is not None and stream_span.attributes is not None
    # Whether a session ran, never its id: not in charstream's attributes, nor in the request's URL ones.
    assert session_span.attributes["charstream.session"] is True
    assert sid not in json.dumps(dict(session_span.attributes)), dict(session_span.attributes)
    assert "/v1/sessions/[id]/generate" in dict(session_span.attributes).values()
    assert session_span.attributes["charstream.model"] == MODEL
    assert stream_span.attributes["charstream.model"] == MODEL and stream_span.attributes["charstream.session"] is False
    assert format(stream_span.context.trace_id, "032x") == trace_id  # the proxy's trace continues here
    # The session continues from its state: nothing to read first.
    for span, generated, prompt in [(session_span, 20, 0), (stream_span, 30, len("JULIET:"))]:
        events = [e for e in span.events if e.name.startswith("charstream.")]
        assert [e.name for e in events] == PHASES
        times = [e.timestamp for e in events]
        assert times == sorted(times)
        assert span.start_time is not None and span.end_time is not None
        assert span.start_time <= times[0] and times[-1] <= span.end_time
        assert events[0].attributes is not None and events[-1].attributes is not None
        assert events[-1].attributes["generated_chars"] == generated
        assert events[-1].attributes["phase"] == "length"
        assert events[0].attributes["prompt_chars"] == prompt


def console_spans(text: str) -> list[dict[str, Any]]:
    """The spans OTEL_TRACES_EXPORTER=console printed among a process's log lines."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while (at := text.find("\n{\n", at)) != -1:
        span, end = decoder.raw_decode(text, at + 1)
        spans.append(span)
        at = end
    return spans


def test_a_trace_followed_through_nginx(models_dir: Path, tmp_path: Path) -> None:
    """A client's traceparent passes nginx (deploy/nginx.conf) and the replica's span continues it."""
    env = {
        "CHARSTREAM_MODELS_DIR": str(models_dir),
        "CHARSTREAM_DEFAULT_MODEL": MODEL,
        "CHARSTREAM_LOG_JSON": "false",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms: print spans soon after they end
    }
    trace_id = secrets.token_hex(16)
    with serve_process(tmp_path / "replica.log", free_port(), **env) as replica:
        nginx = NginxServer(tmp_path / "nginx", [int(replica.base_url.rsplit(":", 1)[1])]).start()
        try:
            with httpx.Client(base_url=nginx.base_url, timeout=30) as c:
                sid = c.post("/v1/sessions", json={"prompt": "ROMEO:"}).json()["id"]
                r = c.post(
                    f"/v1/sessions/{sid}/generate",
                    json={"max_new_chars": 10},
                    headers={"X-Session-Id": sid, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
                )
                assert r.status_code == 200, r.text

            def traced() -> list[dict[str, Any]]:
                spans = console_spans(replica.log.read_text())
                return [s for s in spans if s["context"]["trace_id"] == f"0x{trace_id}"]

            deadline = time.monotonic() + 20
            while not traced():
                assert time.monotonic() < deadline, "the replica never printed the request's span"
                time.sleep(0.05)
        finally:
            nginx.stop()
    (span,) = traced()
    assert span["name"] == "POST /v1/sessions/{session_id}/generate"
    assert span["parent_id"] == "0x00f067aa0ba902b7"  # the client's span, across nginx
    assert span["attributes"]["charstream.session"] is True and sid not in json.dumps(span["attributes"])
    assert [e["name"] for e in span["events"] if e["name"].startswith("charstream.")] == PHASES

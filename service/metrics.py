"""Prometheus metrics, one registry per app so that several apps (tests, workers) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STEP_BUCKETS = (50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 0.1, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "charstream_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.generated_chars = Counter(
            "charstream_generated_chars", "Characters sampled and sent", ["model"], registry=r
        )
        self.prompt_chars = Counter("charstream_prompt_chars", "Prompt and feed characters read", ["model"], registry=r)
        self.step_latency = Histogram(
            "charstream_step_seconds",
            "Wall time of one onnxruntime call",
            ["model", "kind"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "charstream_batch_size",
            "Sessions in one onnxruntime call",
            ["model", "kind"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.active_sessions = Gauge("charstream_sessions", "Sessions held by the server", registry=r)
        self.busy_sessions = Gauge("charstream_sessions_busy", "Sessions with a request running", registry=r)
        self.session_state_bytes = Gauge(
            "charstream_session_state_bytes",
            "Bytes of recurrent state and logits held by sessions",
            registry=r,
        )
        self.session_memory_bytes = Gauge(
            "charstream_session_memory_bytes",
            "State plus bookkeeping bytes of all sessions",
            registry=r,
        )
        self.active_generations = Gauge(
            "charstream_active_generations",
            "Generations and feeds in the scheduler",
            ["model"],
            registry=r,
        )
        self.websockets = Gauge("charstream_websocket_connections", "Open WebSocket connections", registry=r)
        self.open_connections = Gauge(
            "charstream_open_connections",
            "Open /v1 requests and WebSockets (CHARSTREAM_MAX_CONNECTIONS bounds it)",
            registry=r,
        )
        self.refused_connections = Counter(
            "charstream_refused_connections",
            "Requests and WebSockets refused past CHARSTREAM_MAX_CONNECTIONS",
            registry=r,
        )
        self.evicted = Counter("charstream_sessions_evicted", "Sessions dropped after their TTL", registry=r)
        self.errors = Counter("charstream_generation_errors", "Generations ended by an error", ["code"], registry=r)
        self.prompt_cache_hits = Counter(
            "charstream_prompt_cache_hits",
            "Stateless prompts started from a cached prefix state",
            ["model"],
            registry=r,
        )
        self.prompt_cache_misses = Counter(
            "charstream_prompt_cache_misses", "Stateless prompts with no cached prefix state", ["model"], registry=r
        )
        self.prompt_cache_chars = Counter(
            "charstream_prompt_cache_chars_not_read",
            "Prompt characters not read thanks to a cached prefix state",
            ["model"],
            registry=r,
        )
        self.prompt_cache_bytes = Gauge(
            "charstream_prompt_cache_bytes", "Bytes of prompt-prefix states held by this process", registry=r
        )

    def calls(self, model: str, kind: str) -> CallMetrics:
        """Latency and batch size of one model's onnxruntime calls of one kind ("step" or "prime")."""
        return CallMetrics(self.step_latency.labels(model, kind), self.batch_size.labels(model, kind))


class CallMetrics:
    """Histograms with their labels bound once: a label lookup per step costs more than the observation."""

    def __init__(self, latency: Histogram, batch: Histogram) -> None:
        self._latency, self._batch = latency, batch

    def observe(self, seconds: float, batch: int) -> None:
        self._latency.observe(seconds)
        self._batch.observe(batch)

"""Prometheus metrics, one registry per app so that several apps (tests, workers) never collide.

Where a metric means what one of vLLM's means, it has vLLM's name pattern (`charstream:` for
`vllm:`, characters for tokens), its `model_name` label and its bucket boundaries, so that
dashboards built for vLLM read it as it is. A metric renamed that way is still exported under its
old name (and `model` label) for one release, by `Aliases`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py): time to first token, inter-token latency,
# and request latencies (queue time, end to end).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
STEP_BUCKETS = (50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 0.1, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """Every metric the service exports, declared in this class only, in groups an operator reads
    top to bottom: HTTP, generations (vLLM's names), onnxruntime calls, sessions, connections and
    the prompt-state cache."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http(self.registry)
        self._generations(self.registry)
        self._calls(self.registry)
        self._sessions(self.registry)
        self._connections(self.registry)
        self._prompt_cache(self.registry)

    def _http(self, r: CollectorRegistry) -> None:
        self.requests = Counter(
            "charstream_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.errors = Counter("charstream_generation_errors", "Generations ended by an error", ["code"], registry=r)

    def _generations(self, r: CollectorRegistry) -> None:
        """vLLM's metrics, by vLLM's name pattern, label and buckets."""
        self.generated_chars = Counter(
            "charstream:generation_chars", "Characters sampled and sent", ["model_name"], registry=r
        )
        self.prompt_chars = Counter(
            "charstream:prompt_chars", "Prompt and feed characters read", ["model_name"], registry=r
        )
        self.time_to_first_char = Histogram(
            "charstream:time_to_first_char_seconds",
            "From a generation's submission to its first character handed to the transport",
            ["model_name"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_char_latency = Histogram(
            "charstream:inter_char_latency_seconds",
            "Between two characters handed to the transport (a frame of n characters: n gaps of 1/n of its wait)",
            ["model_name"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "charstream:request_queue_time_seconds",
            "From a generation's submission until the scheduler takes it (generations that end)",
            ["model_name"],
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "charstream:e2e_request_latency_seconds",
            "From a generation's submission to its final event handed to the transport",
            ["model_name"],
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "charstream:num_requests_running",
            "Generations the scheduler holds (reading their prompt or decoding)",
            ["model_name"],
            registry=r,
        )
        self.waiting = Gauge(
            "charstream:num_requests_waiting",
            "Generations submitted that the scheduler has not taken yet",
            ["model_name"],
            registry=r,
        )
        self.prefix_cache_queries = Counter(
            "charstream:prefix_cache_queries",
            "Prompt characters looked up in the prompt-state cache",
            ["model_name"],
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "charstream:prefix_cache_hits",
            "Prompt characters found in the prompt-state cache (not read again)",
            ["model_name"],
            registry=r,
        )
        # The old names, one more release.
        old_names = [
            (self.generated_chars, "charstream_generated_chars"),
            (self.prompt_chars, "charstream_prompt_chars"),
        ]
        r.register(Aliases(old_names))

    def _calls(self, r: CollectorRegistry) -> None:
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
        self.active_generations = Gauge(
            "charstream_active_generations",
            "Generations and feeds in the scheduler",
            ["model"],
            registry=r,
        )

    def _sessions(self, r: CollectorRegistry) -> None:
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
        self.evicted = Counter("charstream_sessions_evicted", "Sessions dropped after their TTL", registry=r)

    def _connections(self, r: CollectorRegistry) -> None:
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
        self.rate_limited = Counter(
            "charstream_rate_limited",
            "Requests refused with 429 by a key's limit, by key name (client for a client address) and limit",
            ["key", "limit"],
            registry=r,
        )
        self.rate_limit = Gauge(
            "charstream_rate_limit",
            "Each key's configured limit (requests_per_s, chars_per_s, max_sessions), by key name",
            ["key", "limit"],
            registry=r,
        )
        self.rate_limit_errors = Counter(
            "charstream_rate_limit_errors",
            "Limit checks that failed because the store could not be reached (the request was let through)",
            registry=r,
        )

    def _prompt_cache(self, r: CollectorRegistry) -> None:
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
        self.prompt_cache_shared_hits = Counter(
            "charstream_prompt_cache_shared_hits",
            "Stateless prompts whose prefix state came from the shared store (CHARSTREAM_PROMPT_CACHE_SHARED)",
            ["model"],
            registry=r,
        )
        self.prompt_cache_bytes = Gauge(
            "charstream_prompt_cache_bytes", "Bytes of prompt-prefix states held by this process", registry=r
        )

    def requests_of(self, model: str) -> RequestMetrics:
        return RequestMetrics(self, model)

    def calls(self, model: str, kind: str) -> CallMetrics:
        """Latency and batch size of one model's onnxruntime calls of one kind ("step" or "prime")."""
        return CallMetrics(self.step_latency.labels(model, kind), self.batch_size.labels(model, kind))


class Aliases(Collector):
    """Each metric again under its old name, with the `model` label vLLM's names call `model_name`."""

    def __init__(self, pairs: Sequence[tuple[MetricWrapperBase, str]]) -> None:
        self.pairs = pairs

    def collect(self) -> Iterator[Metric]:
        for metric, old in self.pairs:
            for family in metric.collect():
                alias = Metric(old, f"{family.documentation} (old name of {family.name})", family.type)
                for s in family.samples:
                    labels = {("model" if k == "model_name" else k): v for k, v in s.labels.items()}
                    alias.add_sample(old + s.name[len(family.name) :], labels, s.value, s.timestamp, s.exemplar)
                yield alias


class RequestMetrics:
    """One model's per-request histograms, bound once (a label lookup costs more than an observation)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.ttfc = metrics.time_to_first_char.labels(model)
        self.itl = metrics.inter_char_latency.labels(model)
        self.queue = metrics.queue_time.labels(model)
        self.e2e = metrics.e2e_latency.labels(model)

    def chars(self, submitted: float, last: float | None, n: int) -> float:
        """A frame of `n` characters handed to the transport after the one at `last`; returns now."""
        now = time.perf_counter()
        if last is None:
            self.ttfc.observe(now - submitted)
        else:
            gap = (now - last) / n
            for _ in range(n):
                self.itl.observe(gap)
        return now

    def finished(self, submitted: float, admitted: float) -> None:
        """The final event handed to the transport (`admitted` 0: the scheduler never took the job)."""
        self.e2e.observe(time.perf_counter() - submitted)
        if admitted:
            self.queue.observe(admitted - submitted)


class CallMetrics:
    """Histograms with their labels bound once: a label lookup per step costs more than the observation."""

    def __init__(self, latency: Histogram, batch: Histogram) -> None:
        self._latency, self._batch = latency, batch

    def observe(self, seconds: float, batch: int) -> None:
        self._latency.observe(seconds)
        self._batch.observe(batch)

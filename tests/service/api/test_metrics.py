"""The vLLM-style metrics, scraped from a real server's /metrics after real requests: the names,
the `model_name` label and vLLM's bucket boundaries, counts that match the requests made, running
and waiting while a stream runs, and the old names still exported beside the new ones."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from service.metrics import ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS
from tests.utils import run_server

MODEL = "tiny-lstm"


def scrape(client: httpx.Client) -> dict[str, list[Sample]]:
    """Every sample of /metrics, by sample name (parsed as Prometheus does)."""
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    (found,) = [s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    return found


def bounds(samples: dict[str, list[Sample]], name: str) -> tuple[float, ...]:
    buckets = [s for s in samples[f"{name}_bucket"] if s.labels["model_name"] == MODEL]
    return tuple(float(s.labels["le"]) for s in buckets if s.labels["le"] != "+Inf")


def test_vllm_style_metrics_after_real_requests(models_dir: Path) -> None:
    with run_server(models_dir=models_dir, default_model=MODEL, max_new_chars=100_000) as server, server.client() as c:
        before = scrape(c)
        assert value(before, "charstream:num_requests_running", model_name=MODEL) == 0
        requests = [
            {"prompt": "ROMEO:", "max_new_chars": 40},
            {"prompt": "JULIET:", "max_new_chars": 60, "stream": True},
            {"max_new_chars": 25, "temperature": 0.5},
        ]
        generated = 0
        for body in requests:
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            generated += int(body["max_new_chars"])  # no stop sequences: every request runs to its length

        # While a long stream runs, the scheduler holds it: running 1, waiting 0.
        with c.stream("POST", "/v1/generate", json={"max_new_chars": 100_000, "stream": True}) as stream:
            frames = (line for line in stream.iter_lines() if line.startswith("data:"))
            for _ in range(3):  # the server handed these on: two gaps after the first frame
                next(frames)
            during = scrape(c)
        assert value(during, "charstream:num_requests_running", model_name=MODEL) == 1
        assert value(during, "charstream:num_requests_waiting", model_name=MODEL) == 0

        after = scrape(c)
    n = len(requests)
    ttfc = "charstream:time_to_first_char_seconds"
    assert bounds(after, ttfc) == TTFT_BUCKETS
    assert bounds(after, "charstream:inter_char_latency_seconds") == ITL_BUCKETS
    assert bounds(after, "charstream:request_queue_time_seconds") == REQUEST_LATENCY_BUCKETS
    assert bounds(after, "charstream:e2e_request_latency_seconds") == REQUEST_LATENCY_BUCKETS
    # Every generation saw a first character; the three that ended (not the one cut short) a final event.
    assert value(after, f"{ttfc}_count", model_name=MODEL) == n + 1
    assert value(after, "charstream:request_queue_time_seconds_count", model_name=MODEL) == n
    assert value(after, "charstream:e2e_request_latency_seconds_count", model_name=MODEL) == n
    assert value(after, "charstream:e2e_request_latency_seconds_sum", model_name=MODEL) > 0
    assert value(after, f"{ttfc}_sum", model_name=MODEL) > 0
    # One gap per character after each stream's first frame: at least the cut stream's two.
    chars = value(after, "charstream:generation_chars_total", model_name=MODEL)
    assert chars >= generated + 3
    gaps = value(after, "charstream:inter_char_latency_seconds_count", model_name=MODEL)
    assert 2 <= gaps <= chars - (n + 1)
    # The old names, with the old label, count the same as the new ones.
    assert value(after, "charstream_generated_chars_total", model=MODEL) == chars
    prompt = value(after, "charstream:prompt_chars_total", model_name=MODEL)
    assert prompt == len("ROMEO:") + len("JULIET:")
    assert value(after, "charstream_prompt_chars_total", model=MODEL) == prompt

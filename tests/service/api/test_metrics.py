"""The vLLM-style metrics, scraped from a real server's /metrics after real requests: the names,
the `model_name` label and vLLM's bucket boundaries, counts that match the requests made, running
and waiting while a stream runs, and the old names still exported beside the new ones."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import yaml
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

        # The stream cut short ends at the scheduler's next step: then every count holds still.
        deadline = time.monotonic() + 10
        while value(after := scrape(c), "charstream:num_requests_running", model_name=MODEL):
            assert time.monotonic() < deadline, "the cut stream never ended"
            time.sleep(0.02)
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


def test_the_grafana_dashboard_reads_only_what_the_server_exports(models_dir: Path) -> None:
    """deploy/grafana's dashboard, its data source and the compose files that load it agree with
    the names a real server serves."""
    deploy = Path(__file__).resolve().parents[3] / "deploy"
    dashboard = json.loads((deploy / "grafana/dashboards/charstream.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    referenced = {m for e in exprs for m in re.findall(r"charstream[:_][a-z0-9_:]+", e)}
    assert {"charstream:time_to_first_char_seconds_bucket", "charstream:num_requests_waiting"} <= referenced
    with run_server(models_dir=models_dir, default_model=MODEL) as server, server.client() as c:
        assert c.post("/v1/generate", json={"max_new_chars": 5}).status_code == 200
        families = list(text_string_to_metric_families(c.get("/metrics").text))
    # Every name a family serves, also one with no sample yet (an error counter before any error).
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    served = {f.name + suffix for f in families for suffix in suffixes.get(f.type, [""])}
    assert referenced - served == set(), "the dashboard reads metrics the server does not export"
    source = yaml.safe_load((deploy / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {source["datasources"][0]["uid"]}
    monitoring = yaml.safe_load((deploy.parent / "compose.monitoring.yaml").read_text())["services"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in monitoring["grafana"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in monitoring["prometheus"]["volumes"]
    for name in ("compose.scale.yaml", "compose.scale-sentinel.yaml"):  # what the overlay scrapes and waits for
        base = yaml.safe_load((deploy.parent / name).read_text())["services"]
        assert "charstream" in base and not {"prometheus", "grafana"} & set(base)
    scrape = yaml.safe_load((deploy / "prometheus.yml").read_text())["scrape_configs"][0]["dns_sd_configs"][0]
    assert scrape["names"] == ["charstream"] and scrape["port"] == 8000


def test_prefix_cache_counts_characters_as_vllm_does(models_dir: Path) -> None:
    """charstream:prefix_cache_queries/hits count prompt characters looked up and found, as vLLM's
    prefix_cache_queries/hits count tokens: the same prompt twice is one miss, then a hit."""
    prompt = "ROMEO: But soft, what light through yonder window breaks?"
    with run_server(models_dir=models_dir, default_model=MODEL, prefill_chunk=8) as server, server.client() as c:
        for _ in range(2):
            assert c.post("/v1/generate", json={"prompt": prompt, "max_new_chars": 3}).status_code == 200
        after = scrape(c)
    assert value(after, "charstream:prefix_cache_queries_total", model_name=MODEL) == 2 * len(prompt)
    hits = value(after, "charstream:prefix_cache_hits_total", model_name=MODEL)
    assert len(prompt) - 8 < hits <= len(prompt)  # the second read only what follows the last cached chunk
    assert hits == value(after, "charstream_prompt_cache_chars_not_read_total", model=MODEL)

"""Per-key limits against real servers: a key over its rate gets 429 with Retry-After while
another key goes on, the limit shows in the metrics, and replicas sharing a Redis share the count."""

from __future__ import annotations

from pathlib import Path

from service.api.quotas import window
from tests.redis_server import RedisServer
from tests.utils import run_server

SLOW = "slow-key-0123456789abcdef"
FAST = "fast-key-0123456789abcdef"


def keys_file(folder: Path) -> Path:
    path = folder / "keys.toml"
    # One request in a 50 s window: a second one is over the limit however slowly the machine runs.
    path.write_text(f'[keys.slow]\nkey = "{SLOW}"\nrequests_per_s = 0.02\n\n[keys.fast]\nkey = "{FAST}"\n')
    return path


def test_windows_fit_one_hit_and_burst_characters() -> None:
    assert (window("requests_per_s", 5).amount, window("requests_per_s", 5).multiples) == (5, 1)
    assert (window("requests_per_s", 0.2).amount, window("requests_per_s", 0.2).multiples) == (1, 5)
    assert (window("chars_per_s", 100).amount, window("chars_per_s", 100).multiples) == (1000, 10)


def test_a_key_over_its_rate_gets_429_and_others_go_on(models_dir: Path, tmp_path: Path) -> None:
    with run_server(models_dir=models_dir, keys_file=keys_file(tmp_path), admin_key="admin-0123456789abcd") as s:
        with s.client() as c:
            slow = {"Authorization": f"Bearer {SLOW}"}
            assert c.get("/v1/models", headers=slow).status_code == 200
            refused = c.get("/v1/models", headers=slow)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(refused.headers["Retry-After"]) <= 50 and "'slow'" in refused.json()["error"]["message"]
            for _ in range(20):  # no limit of its own, no default: unlimited
                assert c.get("/v1/models", headers={"X-API-Key": FAST}).status_code == 200
            assert c.get("/healthz").status_code == 200  # probes are never limited
            metrics = c.get("/metrics").text
        assert 'charstream_rate_limited_total{key="slow",limit="requests_per_s"} 1.0' in metrics
        assert 'charstream_rate_limit{key="slow",limit="requests_per_s"} 0.02' in metrics


def test_without_keys_the_default_rate_counts_per_client_address(models_dir: Path) -> None:
    with run_server(models_dir=models_dir, requests_per_s=0.02) as s, s.client() as c:
        assert c.get("/v1/models").status_code == 200
        assert c.get("/v1/models").status_code == 429


def test_replicas_sharing_a_redis_share_the_count(models_dir: Path, tmp_path: Path, redis_server: RedisServer) -> None:
    keys = keys_file(tmp_path)
    with (
        run_server(models_dir=models_dir, keys_file=keys, session_store=redis_server.url) as one,
        run_server(models_dir=models_dir, keys_file=keys, session_store=redis_server.url) as two,
    ):
        slow = {"Authorization": f"Bearer {SLOW}"}
        with one.client() as a, two.client() as b:
            assert a.get("/v1/models", headers=slow).status_code == 200
            assert b.get("/v1/models", headers=slow).status_code == 429  # the other replica's hit counted
        assert any(k.startswith(b"charstream-limits") for k in redis_server.client().keys("*"))

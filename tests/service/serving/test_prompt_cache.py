"""The prompt-state cache: its keys and byte bound alone, then on real servers with it on and off."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from service.errors import ServiceConfigError
from service.serving.prompt_cache import ENTRY_OVERHEAD, PromptCache, decode, encode, prefix_digests
from service.settings import load_settings
from tests.redis_server import RedisServer
from tests.utils import SHAKESPEARE, run_server

SHA = "ab" * 32


def state(value: float) -> list[np.ndarray]:
    return [np.full((2, 8), value, np.float32), np.full((2, 8), -value, np.float32)]


def test_a_prefix_has_one_key_in_every_prompt_and_models_and_chunk_sizes_never_share() -> None:
    a = prefix_digests(SHA, list(range(600)), 256)
    b = prefix_digests(SHA, [*range(512), 9, 9], 256)
    assert sorted(a) == [256, 512, 600] and sorted(b) == [256, 512, 514]
    assert a[256] == b[256] and a[512] == b[512] and a[600] != b[514]
    assert prefix_digests("cd" * 32, list(range(600)), 256)[256] != a[256]
    assert sorted(prefix_digests(SHA, list(range(512)), 256)) == [256, 512]
    # Read in other chunks, the state after the same prefix is another key.
    assert prefix_digests(SHA, list(range(512)), 128)[512] != a[512]


def test_the_longest_cached_prefix_wins_and_the_rest_is_kept_as_read() -> None:
    cache = PromptCache(1 << 20)
    ids = list(range(700))
    plan = cache.plan(SHA, ids, 256)
    assert plan.hit is None and plan.start == 0 and sorted(plan.digests) == [256, 512, 700]
    keep = cache.keeper(plan)
    assert keep is not None
    keep(256, state(1.0), np.ones(5, np.float32))
    keep(300, state(9.0), np.ones(5, np.float32))  # not a boundary of this prompt: not kept
    assert len(cache) == 1
    longer = cache.plan(SHA, [*range(512), 5, 5, 5], 256)
    assert longer.start == 256 and longer.hit is not None and float(longer.hit.state[0][0, 0]) == 1.0
    assert sorted(longer.digests) == [512, 515]  # what is left to keep, counted from the prompt's start
    keep_longer = cache.keeper(longer)
    assert keep_longer is not None
    keep_longer(256, state(2.0), np.ones(5, np.float32))  # the job read 256 more: position 512
    again = cache.plan(SHA, ids, 256)
    assert again.start == 512 and again.hit is not None and float(again.hit.state[1][0, 0]) == -2.0


def test_the_cache_stays_under_its_bytes_dropping_the_least_recently_used() -> None:
    entry = 2 * 2 * 8 * 4 + 5 * 4 + ENTRY_OVERHEAD
    cache = PromptCache(3 * entry)
    keys = [bytes([i]) * 20 for i in range(5)]
    for i, key in enumerate(keys[:3]):
        cache.put(key, state(float(i)), np.zeros(5, np.float32))
    assert cache.bytes == 3 * entry
    with cache._lock:
        cache._entries.move_to_end(keys[0])  # the first one used again
    cache.put(keys[3], state(3.0), np.zeros(5, np.float32))
    assert cache.bytes <= 3 * entry and set(cache._entries) == {keys[0], keys[2], keys[3]}
    tiny = PromptCache(10)
    tiny.put(keys[4], state(1.0), np.zeros(5, np.float32))
    assert len(tiny) == 0 and tiny.bytes == 0


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.slow
def test_cached_prefixes_give_the_same_text_and_are_counted(models_dir: Path) -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    template = text[:1000]
    prompts = [template, template + text[5000:5100], template[:700] + text[9000:9050], template]
    settings = dict(models_dir=models_dir, default_model="tiny-lstm", prefill_chunk=64, max_prompt_chars=5000)
    bodies = [{"prompt": p, "max_new_chars": 40, "seed": 11 + i, "temperature": 0.8} for i, p in enumerate(prompts)]
    with run_server(**settings, prompt_cache_bytes=0) as off, off.client() as c:
        expected = [c.post("/v1/generate", json=b).json()["text"] for b in bodies]
        assert metric(c.get("/metrics").text, "charstream_prompt_cache_hits_total") == 0
    with run_server(**settings) as on, on.client() as c:
        got = [c.post("/v1/generate", json=b).json()["text"] for b in bodies]
        page = c.get("/metrics").text
    assert got == expected
    # 1: a miss. 2: the last boundary inside the first prompt (960; the whole first prompt, 1000, ends
    # off a boundary, so it serves only itself). 3: the boundary at 640. 4: the whole first prompt.
    assert metric(page, "charstream_prompt_cache_misses_total") == 1
    assert metric(page, "charstream_prompt_cache_hits_total") == 3
    assert metric(page, "charstream_prompt_cache_chars_not_read_total") == 960 + 640 + 1000
    assert metric(page, "charstream_prompt_cache_bytes") > 0


@pytest.mark.slow
def test_many_choices_read_their_prompt_once(models_dir: Path) -> None:
    prompt = SHAKESPEARE.read_text(encoding="utf-8")[2000:2700]
    settings = dict(models_dir=models_dir, default_model="tiny-lstm", prefill_chunk=64, max_prompt_chars=5000)
    body = {"model": "tiny-lstm", "prompt": prompt, "n": 30, "max_tokens": 20, "seed": 5}
    with run_server(**settings, prompt_cache_bytes=0) as off, off.client() as c:
        expected = [choice["text"] for choice in c.post("/v1/completions", json=body).json()["choices"]]
    with run_server(**settings) as on, on.client() as c:
        got = [choice["text"] for choice in c.post("/v1/completions", json=body).json()["choices"]]
        page = c.get("/metrics").text
    assert got == expected and len(set(got)) > 1
    # The prompt read once (a miss), then every choice started from the state after all of it.
    assert metric(page, "charstream_prompt_cache_misses_total") == 1
    assert metric(page, "charstream_prompt_cache_hits_total") == 30
    assert metric(page, "charstream_prompt_cache_chars_not_read_total") == 30 * 700


def test_a_shared_cache_needs_redis() -> None:
    with pytest.raises(ServiceConfigError, match="CHARSTREAM_PROMPT_CACHE_SHARED needs a Redis session store"):
        load_settings(prompt_cache_shared=True, session_store="memory")


def test_a_state_survives_the_trip_through_bytes(models_dir: Path) -> None:
    from service.core.engine import Engine

    info = Engine(models_dir / "tiny-lstm" / "model.onnx").info
    kept = [np.random.default_rng(1).random((2, 48), np.float32) for _ in info.state_names]
    logits = np.arange(info.vocab_size, dtype=np.float32)
    back = decode(encode(kept, logits), info)
    assert back is not None and all(np.array_equal(a, b) for a, b in zip(back.state, kept, strict=True))
    assert np.array_equal(back.logits, logits)
    assert decode(encode(kept, logits)[:-4], info) is None  # another model's shape: not used


@pytest.mark.slow
def test_workers_share_prompt_states_through_redis(models_dir: Path, redis_server: RedisServer) -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    prompt = text[3000:4000]
    settings = dict(models_dir=models_dir, default_model="tiny-lstm", prefill_chunk=64, max_prompt_chars=5000)
    body = {"prompt": prompt + text[7000:7030], "max_new_chars": 40, "seed": 3}
    with run_server(**settings, prompt_cache_bytes=0) as off, off.client() as c:
        expected = c.post("/v1/generate", json=body).json()["text"]
    shared = dict(settings, session_store=redis_server.url, prompt_cache_shared=True)
    with run_server(**shared) as a, run_server(**shared) as b:
        with a.client() as c:
            assert c.post("/v1/generate", json={"prompt": prompt, "max_new_chars": 5}).status_code == 200
        redis = redis_server.client()
        deadline = time.monotonic() + 10
        while len(redis.keys("charstream:prompt:*")) < 16:  # 15 chunk boundaries and the whole prompt
            assert time.monotonic() < deadline, "the states never reached Redis"
            time.sleep(0.02)
        with b.client() as c:  # B has never seen the prompt: its state comes from what A read
            got = c.post("/v1/generate", json=body).json()["text"]
            page = c.get("/metrics").text
    assert got == expected
    assert metric(page, "charstream_prompt_cache_shared_hits_total") == 1
    assert metric(page, "charstream_prompt_cache_chars_not_read_total") == 960

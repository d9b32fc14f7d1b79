"""Every request's work is counted before it runs, against real servers: work over one request's
budget is refused with 413 naming the fields that make it (an OpenAI-shaped 400 on the OpenAI
side, which the `openai` client raises), the same count is charged to the key's characters a
second (HTTP and WebSocket alike), and a long /v1/score context is read once, not once per text,
while a short generation sent during it finishes first."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from websockets.sync.client import connect

from service.api import budget
from service.api.auth import WS_KEY_PREFIX, WS_PROTOCOL
from service.core import SamplingParams
from service.errors import TooLarge
from service.settings import load_settings
from tests.utils import run_server

MODEL = "tiny-lstm"
KEY = "thrifty-key-0123456789abcd"


def test_work_is_counted_from_the_fields_that_multiply_it() -> None:
    params = SamplingParams(max_new_chars=4096, logprobs=True, top_logprobs=20)
    work = budget.generation(params, prompt_chars=10, choices=1000)
    assert work.chars == 10 + 1000 * 4096 * 21
    annotated = SamplingParams(max_new_chars=0, prompt_logprobs=True, top_logprobs=5)
    assert budget.generation(annotated, prompt_chars=100).chars == 100 * 6
    assert budget.reading(1000, 3, "texts").chars == 4000
    with pytest.raises(TooLarge, match="CHARSTREAM_MAX_REQUEST_WORK") as refused:
        budget.check(load_settings(max_request_work=1_000_000), work)
    assert refused.value.field == "prompt, max_new_chars, top_logprobs"


def test_a_request_over_the_budget_is_refused_before_it_runs(models_dir: Path) -> None:
    with run_server(models_dir=models_dir, default_model=MODEL, max_request_work=50_000) as s, s.client() as c:
        client = openai.OpenAI(base_url=f"{s.base_url}/v1", api_key="unused", max_retries=0)
        # The request that ran for minutes and grew without bound: n x max_tokens x (1 + logprobs).
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=MODEL, prompt="ROMEO:", n=1000, max_tokens=4096, logprobs=20)
        error = refused.value.body
        assert isinstance(error, dict) and error["code"] == "too_large"
        assert "1000 choices x 4096 chars x (1 + 20 alternatives)" in error["message"]
        assert error["param"].startswith("n, max_tokens, logprobs")
        unique = c.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "a", "n": 20, "max_tokens": 1000, "unique": True},
        )  # its retries count too: 20 x 4 attempts x 1000 > 50,000 > 20 x 1000
        assert unique.status_code == 400 and "unique" in unique.json()["error"]["param"]
        score = c.post("/v1/score", json={"texts": ["a"] * 10, "context": "b" * 1000, "top_logprobs": 5})
        assert score.status_code == 200  # (1000 + 10) x 6
        score = c.post("/v1/score", json={"texts": ["abcdefghij"] * 1000, "top_logprobs": 5})
        assert score.status_code == 413 and score.json()["error"]["field"] == "texts, context, top_logprobs"
        r = c.post("/v1/generate", json={"max_new_chars": 4096, "top_logprobs": 20})
        assert r.status_code == 413 and "top_logprobs" in r.json()["error"]["field"]
        assert c.post("/v1/generate", json={"max_new_chars": 40}).status_code == 200


def test_work_is_charged_to_the_keys_characters(models_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.thrifty]\nkey = "{KEY}"\nchars_per_s = 100\n')  # 1,000 in a 10 s window
    with run_server(models_dir=models_dir, default_model=MODEL, keys_file=keys) as s:
        headers = {"Authorization": f"Bearer {KEY}"}
        with s.client(headers=headers) as c:
            assert c.post("/v1/generate", json={"prompt": "ROMEO:", "max_new_chars": 600}).status_code == 200
            over = c.post("/v1/generate", json={"max_new_chars": 600})
            assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1
            whole = c.post("/v1/generate", json={"max_new_chars": 2000})  # more than a whole window holds
            assert whole.status_code == 413 and "chars_per_s" in whole.json()["error"]["message"]
        # A WebSocket message is a request like any other: its work is charged to the same key.
        with connect(f"{s.ws_url}/v1/stream", subprotocols=[WS_PROTOCOL, WS_KEY_PREFIX + KEY]) as ws:  # type: ignore[list-item]
            ws.send(json.dumps({"type": "generate", "max_new_chars": 600}))
            refused: dict[str, Any] = json.loads(ws.recv(timeout=30))
        assert refused["type"] == "error" and refused["code"] == "rate_limited"


def test_a_long_context_is_read_once_and_a_short_generation_goes_first(models_dir: Path) -> None:
    context = ("Now is the winter of our discontent\n" * 2800)[:100_000]
    texts = ["a", "b", "ROMEO", " the"] * 250  # 1,000 short texts after a 100,000-character context
    with run_server(models_dir=models_dir, default_model=MODEL, prefill_chunk=32) as s, s.client() as c:
        finished: list[str] = []
        scored: dict[str, Any] = {}

        def score() -> None:
            scored["response"] = c.post("/v1/score", json={"texts": texts, "context": context}, timeout=300)
            finished.append("score")

        attack = threading.Thread(target=score)
        attack.start()
        with httpx.Client(base_url=s.base_url, timeout=300) as other:
            # Once the context is being read, a 50-character generation joins the scheduler beside it.
            while not _running(other):
                assert attack.is_alive(), "the score ended before it could be watched"
                time.sleep(0.01)
            r = other.post("/v1/generate", json={"prompt": "ROMEO:", "max_new_chars": 50})
            finished.append("generate")
        attack.join()
        assert r.status_code == 200 and len(r.json()["text"]) == 50
        # The context takes thousands of 32-position chunks; the generation, 50 steps between them.
        assert finished == ["generate", "score"]
        response = scored["response"]
        assert response.status_code == 200, response.text
        # Each text scored from the state after the context equals the text scored alone after it.
        alone = c.post("/v1/score", json={"texts": ["ROMEO"], "context": context}).json()["scores"][0]
        assert response.json()["scores"][2]["nll"] == pytest.approx(alone["nll"], abs=1e-4)
        assert len(response.json()["scores"]) == len(texts)


def _running(client: httpx.Client) -> bool:
    metrics = client.get("/metrics").text
    line = next(
        x for x in metrics.splitlines() if x.startswith(f'charstream:num_requests_running{{model_name="{MODEL}"}}')
    )
    return float(line.rsplit(" ", 1)[1]) >= 1

"""Structured outputs on every generate route of a real server: native JSON, SSE, WebSocket, sessions and
OpenAI's completions with the official client; every answer matches and ends with finish_reason stop."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from websockets.sync.client import connect

from tests.utils import Server, run_server, tiny_train_config

NAME = r"[A-Z][a-z]{2,8}: [a-z]{1,10}\."
CHOICES = ["ROMEO", "JULIET", "KING HENRY"]


def sse_text(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    texts, final = [], {}
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            frame = json.loads(line[6:])
            if "text" in frame:
                texts.append(frame["text"])
            else:
                final = frame
    return "".join(texts), final


def test_native_json_and_sse(server: Server) -> None:
    with server.client() as c:
        for seed in range(5):
            body = {"prompt": "\n", "seed": seed, "structured_outputs": {"regex": NAME}}
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 200 and r.json()["finish_reason"] == "stop", r.text
            assert re.fullmatch(NAME, r.json()["text"])
            with c.stream("POST", "/v1/generate", json=body | {"stream": True}) as s:
                text, final = sse_text(s)
            assert text == r.json()["text"] and final["finish_reason"] == "stop"


def test_sessions_keep_the_constrained_text_in_their_state(server: Server) -> None:
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"seed": 3, "prompt": "KING:\n"}).json()["id"]
        r = c.post(f"/v1/sessions/{sid}/generate", json={"structured_outputs": {"choice": CHOICES}})
        assert r.status_code == 200 and r.json()["text"] in CHOICES and r.json()["finish_reason"] == "stop"
        assert c.get(f"/v1/sessions/{sid}").json()["history_chars"] == 6 + len(r.json()["text"])


def test_websocket(server: Server) -> None:
    with connect(f"{server.ws_url}/v1/stream") as ws:
        grammar = 'start: "a" start "b" | "c"'
        ws.send(json.dumps({"type": "generate", "prompt": "\n", "seed": 1, "structured_outputs": {"grammar": grammar}}))
        texts = []
        while (m := json.loads(ws.recv(timeout=30)))["type"] not in ("done", "error"):
            if m["type"] == "text":
                texts.append(m["text"])
        text = "".join(texts)
        assert m["type"] == "done" and m["finish_reason"] == "stop", m
        assert re.fullmatch("(a*)c(b*)", text) and text.count("a") == text.count("b")
        ws.send(json.dumps({"type": "generate", "structured_outputs": {"regex": "(a|b"}}))
        error = json.loads(ws.recv(timeout=30))
        assert error["type"] == "error" and error["code"] == "invalid_input" and "unclosed group" in error["message"]


def test_completions_with_the_openai_client(server: Server) -> None:
    with OpenAI(base_url=f"{server.base_url}/v1", api_key="any", max_retries=0) as client:
        answer = client.completions.create(
            model="tiny-lstm",
            prompt="\n",
            max_tokens=100,
            n=4,
            seed=7,
            extra_body={"structured_outputs": {"regex": NAME}},
        )
        for choice in answer.choices:
            assert re.fullmatch(NAME, choice.text) and choice.finish_reason == "stop"
        chunks = list(
            client.completions.create(
                model="tiny-lstm",
                prompt="\n",
                max_tokens=100,
                seed=7,
                stream=True,
                extra_body={"structured_outputs": {"regex": NAME}},
            )
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == answer.choices[0].text
        # The field is never ignored: JSON from a model that cannot write braces is refused, by name.
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(
                model="tiny-lstm", prompt="\n", extra_body={"response_format": {"type": "json_object"}}
            )
        assert error.value.param == "response_format" and "vocabulary lacks" in error.value.message


def test_a_constraint_too_costly_to_follow_is_refused_by_its_probe(server: Server) -> None:
    """a{100000} compiles cheaply but takes ~90 ms a mask: the probe stops at its first mask, so the answer is
    the cost (not the compile timeout), and asking again while and after it compiles gets the same verdict."""
    body = {"prompt": "\n", "structured_outputs": {"regex": "a{100000}"}}
    with server.client() as c:
        for _ in range(2):
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert error["field"] == "structured_outputs.regex" and "too costly to follow" in error["message"], error
        # The server is not held up: a cheap constraint is served next.
        r = c.post("/v1/generate", json={"prompt": "\n", "structured_outputs": {"choice": CHOICES}})
        assert r.status_code == 200 and r.json()["text"] in CHOICES


def test_max_new_chars_first_ends_with_length_and_a_prefix(server: Server) -> None:
    with server.client() as c:
        r = c.post("/v1/generate", json={"prompt": "\n", "max_new_chars": 3, "structured_outputs": {"regex": NAME}})
        assert r.json()["finish_reason"] == "length" and re.fullmatch(r"[A-Z][a-z]{2}", r.json()["text"])


@pytest.fixture(scope="module")
def json_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose only model was trained on JSON lines (its vocabulary has braces, quotes, digits)."""
    from benchmarks.constraint_cases import json_lines
    from training.export import export_many
    from training.train import train

    folder = tmp_path_factory.mktemp("json-server")
    corpus = folder / "json.txt"
    corpus.write_text(json_lines(1500), encoding="utf-8")
    train(tiny_train_config(corpus, folder / "run", max_steps=80, eval_interval=80))
    export_many([str(folder / "run" / "best.pt")], str(folder / "models"), "fp32", names=["tiny-json"])
    with run_server(models_dir=folder / "models", default_model="tiny-json") as s:
        yield s


def test_openai_response_format_gives_json(json_server: Server) -> None:
    schema = {
        "type": "object",
        "properties": {"size": {"enum": ["S", "M", "L"]}, "id": {"type": "integer"}},
        "required": ["size", "id"],
        "additionalProperties": False,
    }
    with OpenAI(base_url=f"{json_server.base_url}/v1", api_key="any", max_retries=0) as client:
        answer = client.completions.create(
            model="tiny-json",
            prompt="\n",
            max_tokens=200,
            n=8,
            seed=3,
            extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "item", "schema": schema}}},
        )
        done = [c.text for c in answer.choices if c.finish_reason == "stop"]
        assert done, [c.text for c in answer.choices]
        for text in done:
            value = json.loads(text)
            assert list(value) == ["size", "id"] and value["size"] in "SML" and isinstance(value["id"], int)
        objects = client.completions.create(
            model="tiny-json",
            prompt="\n",
            max_tokens=300,
            n=4,
            seed=5,
            extra_body={"response_format": {"type": "json_object"}},
        )
        complete = [c.text for c in objects.choices if c.finish_reason == "stop"]
        assert complete and all(isinstance(json.loads(text), dict) for text in complete)

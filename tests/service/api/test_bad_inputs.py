"""Every bad input gets a clear 4xx naming the field (HTTP) or an error message on a connection
that stays usable (WebSocket): a table over both, against a real server, then a check that
nothing was left running or leased."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.utils import Server, leased_sessions

ANNOTATE = {"layer": 0, "units": [0]}

# (body, status, code, field). The server's limits (tests/service/conftest.py): 20,000-character
# prompts, 100,000 new characters; the default model is tiny-lstm (2 x 48, 65 characters).
GENERATE_CASES: list[tuple[Any, int, str, str | None]] = [
    ("not json", 400, "invalid_json", None),
    ("[" * 100_000, 400, "invalid_json", None),
    ('{"prompt": "A", "temperature": NaN}', 422, "invalid_input", "temperature"),
    ('{"prompt": "A", "temperature": 1e999}', 422, "invalid_input", "temperature"),
    ({"top_k": 87120311507293626485964800}, 422, "invalid_input", "top_k"),
    ({"top_k": 66}, 422, "invalid_input", "top_k"),
    ({"top_k": -1}, 422, "invalid_input", "top_k"),
    ({"top_k": 1.5}, 422, "invalid_input", "top_k"),
    ({"seed": 2**64}, 422, "invalid_input", "seed"),
    ({"seed": -1}, 422, "invalid_input", "seed"),
    ({"max_new_chars": 10**30}, 422, "invalid_input", "max_new_chars"),
    ({"max_new_chars": 100_001}, 422, "invalid_input", "max_new_chars"),
    ({"max_new_chars": 0}, 422, "invalid_input", "max_new_chars"),
    ({"top_p": 0}, 422, "invalid_input", "top_p"),
    ({"temperature": 11}, 422, "invalid_input", "temperature"),
    ({"stop": [""]}, 422, "invalid_input", "stop.0"),
    ({"stop": ["x" * 65]}, 422, "invalid_input", "stop.0"),
    ({"stop": ["a"] * 9}, 422, "invalid_input", "stop"),
    ({"stop": "a"}, 422, "invalid_input", "stop"),
    ({"prompt": "x" * 20_001}, 413, "too_large", "prompt"),
    ({"prompt": "€uro"}, 422, "invalid_input", "prompt"),
    ({"prompt": 5}, 422, "invalid_input", "prompt"),
    ({"prompt": ["a"]}, 422, "invalid_input", "prompt"),
    ({"model": "nope"}, 404, "not_found", "model"),
    ({"model": "x" * 1000}, 422, "invalid_input", "model"),
    ({"session_id": "nope"}, 404, "not_found", "session_id"),
    ({"session_id": "x" * 65}, 422, "invalid_input", "session_id"),
    ({"unknown": 1}, 422, "invalid_input", "unknown"),
    ({"top_logprobs": 21}, 422, "invalid_input", "top_logprobs"),
    ({"activations": {"layer": 2, "units": [0]}}, 422, "invalid_input", "activations.layer"),
    ({"activations": {"layer": 0, "units": [48]}}, 422, "invalid_input", "activations.units"),
    ({"activations": {"layer": 0, "units": list(range(33))}}, 422, "invalid_input", "activations.units"),
    ({"activations": {"layer": 0, "units": [1, 1]}}, 422, "invalid_input", "activations.units"),
    ({"activations": {"layer": 0, "units": [1], "state": "x"}}, 422, "invalid_input", "activations.state"),
    ({"activations": {"layer": -1, "units": [1]}}, 422, "invalid_input", "activations.layer"),
    (
        {"model": "tiny-gru", "activations": {"layer": 0, "units": [1], "state": "c"}},
        422,
        "invalid_input",
        "activations.state",
    ),
    ({"prompt": "a" * 10_001, "activations": ANNOTATE | {"prompt": True}}, 413, "too_large", "prompt"),
    # Structured outputs: exactly one kind, each bounded; compile errors and unsatisfiable ones name the kind.
    ({"structured_outputs": {}}, 422, "invalid_input", "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, 422, "invalid_input", "structured_outputs"),
    ({"structured_outputs": {"regex": ""}}, 422, "invalid_input", "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "a" * 16_385}}, 422, "invalid_input", "structured_outputs.regex"),
    ({"structured_outputs": {"choice": []}}, 422, "invalid_input", "structured_outputs.choice"),
    ({"structured_outputs": {"choice": ["a"] * 257}}, 422, "invalid_input", "structured_outputs.choice"),
    ({"structured_outputs": {"json": "x"}}, 422, "invalid_input", "structured_outputs.json"),
    ({"structured_outputs": {"grammar": 5}}, 422, "invalid_input", "structured_outputs.grammar"),
    ({"structured_outputs": {"lark": "x"}}, 422, "invalid_input", "structured_outputs.lark"),
    ({"structured_outputs": {"regex": "(a|b"}}, 422, "invalid_input", "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "Z€Z"}}, 422, "invalid_input", "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "((a{100}){100}){100}"}}, 422, "invalid_input", "structured_outputs.regex"),
    ({"structured_outputs": {"json": {"type": "object"}}}, 422, "invalid_input", "structured_outputs.json"),
    ({"structured_outputs": {"json": {"type": "nonsense"}}}, 422, "invalid_input", "structured_outputs.json"),
    ({"structured_outputs": {"grammar": "start: foo"}}, 422, "invalid_input", "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": ["€"]}}, 422, "invalid_input", "structured_outputs.choice"),
    # Sampling controls.
    ({"min_p": -0.1}, 422, "invalid_input", "min_p"),
    ({"min_p": 1.5}, 422, "invalid_input", "min_p"),
    ({"repetition_penalty": 0}, 422, "invalid_input", "repetition_penalty"),
    ({"repetition_penalty": 11}, 422, "invalid_input", "repetition_penalty"),
    # Steering: validated like activations.
    ({"steer": [{"layer": 0, "unit": 0}]}, 422, "invalid_input", "steer.0"),
    ({"steer": [{"layer": 0, "unit": 0, "value": 1, "add": 1}]}, 422, "invalid_input", "steer.0"),
    ({"steer": [{"layer": 0, "unit": 0, "value": 101}]}, 422, "invalid_input", "steer.0.value"),
    ({"steer": [{"layer": 0, "unit": 0, "add": -1e9}]}, 422, "invalid_input", "steer.0.add"),
    ('{"steer": [{"layer": 0, "unit": 0, "add": NaN}]}', 422, "invalid_input", "steer.0.add"),
    ({"steer": [{"layer": 2, "unit": 0, "value": 1}]}, 422, "invalid_input", "steer.0.layer"),
    ({"steer": [{"layer": 0, "unit": 48, "value": 1}]}, 422, "invalid_input", "steer.0.unit"),
    ({"steer": [{"layer": 0, "unit": -1, "value": 1}]}, 422, "invalid_input", "steer.0.unit"),
    ({"steer": [{"layer": 0, "unit": 0, "value": 1, "state": "x"}]}, 422, "invalid_input", "steer.0.state"),
    ({"steer": [{"layer": 0, "unit": 0, "value": 1}] * 33}, 422, "invalid_input", "steer"),
    (
        {"model": "tiny-gru", "steer": [{"layer": 0, "unit": 0, "value": 1, "state": "c"}]},
        422,
        "invalid_input",
        "steer.0.state",
    ),
]


def post(c: httpx.Client, path: str, body: Any) -> httpx.Response:
    if isinstance(body, str):
        return c.post(path, content=body, headers={"content-type": "application/json"})
    return c.post(path, json=body)


@pytest.mark.parametrize(("body", "status", "code", "field"), GENERATE_CASES)
def test_generate_rejects(server: Server, body: Any, status: int, code: str, field: str | None) -> None:
    with server.client() as c:
        for path in ("/v1/generate", "/v1/generate?stream=ignored"):
            r = post(c, path, body)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert error["code"] == code and error.get("field") == field, error
            assert "Traceback" not in r.text and error["message"]


def test_session_routes_reject(server: Server) -> None:
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"seed": 1}).json()["id"]
        cases: list[tuple[str, str, Any, int, str]] = [
            ("POST", f"/v1/sessions/{sid}/feed", {"text": ""}, 422, "invalid_input"),
            ("POST", f"/v1/sessions/{sid}/feed", {"text": "€"}, 422, "invalid_input"),
            ("POST", f"/v1/sessions/{sid}/feed", "[" * 50_000, 400, "invalid_json"),
            ("POST", f"/v1/sessions/{sid}/feed", {"text": "a", "top_g": 0}, 422, "invalid_input"),
            ("POST", f"/v1/sessions/{sid}/feed", {"text": "a", "logprobs": [1]}, 422, "invalid_input"),
            ("POST", f"/v1/sessions/{sid}/feed", {"text": "a" * 10_001, "logprobs": True}, 413, "too_large"),
            ("POST", "/v1/sessions/nope/feed", {"text": "a"}, 404, "not_found"),
            ("POST", f"/v1/sessions/{sid}/fork", {"seed": -5}, 422, "invalid_input"),
            ("POST", f"/v1/sessions/{sid}/generate", {"top_k": 10**40}, 422, "invalid_input"),
            ("POST", f"/v1/sessions/{sid}/generate", {"model": "tiny-lstm"}, 422, "invalid_input"),
            ("POST", "/v1/sessions", {"seed": 2**70}, 422, "invalid_input"),
            ("POST", "/v1/sessions", {"model": "nope"}, 404, "not_found"),
            ("GET", "/v1/sessions/" + "x" * 300, None, 404, "not_found"),
            ("DELETE", "/v1/sessions/nope", None, 404, "not_found"),
        ]
        for method, path, body, status, code in cases:
            r = post(c, path, body) if method == "POST" else c.request(method, path)
            assert r.status_code == status and r.json()["error"]["code"] == code, (method, path, r.text)
        # The session took none of it and is free.
        assert c.get(f"/v1/sessions/{sid}").json()["history_chars"] == 0
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204


SCORE_CASES: list[tuple[Any, int, str, str | None]] = [
    ("not json", 400, "invalid_json", None),
    ({}, 422, "invalid_input", "texts"),
    ({"texts": []}, 422, "invalid_input", "texts"),
    ({"texts": "ROMEO"}, 422, "invalid_input", "texts"),
    ({"texts": [""]}, 422, "invalid_input", "texts.0"),
    ({"texts": ["a", "€"]}, 422, "invalid_input", "texts.1"),
    ({"texts": ["a"] * 1001}, 422, "invalid_input", "texts"),
    ({"texts": ["a", "x" * 20_001]}, 413, "too_large", "texts.1"),
    ({"texts": ["a" * 20_000] * 51}, 413, "too_large", "texts"),
    ({"texts": ["a"], "context": "€"}, 422, "invalid_input", "context"),
    ({"texts": ["a"], "top_logprobs": 21}, 422, "invalid_input", "top_logprobs"),
    ({"texts": ["a"], "top_logprobs": -1}, 422, "invalid_input", "top_logprobs"),
    ({"texts": ["a"], "model": "nope"}, 404, "not_found", "model"),
    ({"texts": ["a"], "seed": 1}, 422, "invalid_input", "seed"),
]


@pytest.mark.parametrize(("body", "status", "code", "field"), SCORE_CASES)
def test_score_rejects(server: Server, body: Any, status: int, code: str, field: str | None) -> None:
    with server.client() as c:
        r = post(c, "/v1/score", body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["code"] == code and error.get("field") == field, error


# /v1/completions answers in OpenAI's shape: 400 with the field in `param`.
COMPLETION_CASES: list[tuple[dict[str, Any], str]] = [
    ({"n": 1001}, "n"),
    ({"n": 0}, "n"),
    ({"n": 100, "prompt": ["A"] * 11}, "n"),
    ({"unique": "maybe"}, "unique"),
    ({"unique": True, "stream": True}, "unique"),
    ({"n": 200, "structured_outputs": {"regex": "a{500}"}}, "n"),  # 200 rows of ~0.13 ms masks: ~27 ms a step
    ({"response_format": {"type": "json_object"}}, "response_format"),  # tiny-lstm has no braces
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
        "response_format.json_schema",
    ),
]


@pytest.mark.parametrize(("fields", "param"), COMPLETION_CASES)
def test_completions_reject(server: Server, fields: dict[str, Any], param: str) -> None:
    with server.client() as c:
        r = post(c, "/v1/completions", {"model": "tiny-lstm", "prompt": "A", "max_tokens": 3} | fields)
        assert r.status_code == 400, (fields, r.text)
        assert r.json()["error"]["param"] == param, r.json()


WS_CASES: list[tuple[str, str, str]] = [
    ("[" * 100_000, "invalid_json", "nested too deeply"),
    ("x" * 200_000, "too_large", "limit"),
    (json.dumps({"type": "generate", "top_k": 87120311507293626485964800}), "invalid_input", "top_k"),
    (json.dumps({"type": "generate", "seed": 2**64}), "invalid_input", "seed"),
    (json.dumps({"type": "generate", "activations": {"layer": 9, "units": [0]}}), "invalid_input", "activations"),
    (json.dumps({"type": "generate", "prompt": "a" * 20_001}), "too_large", "prompt"),
    (json.dumps({"type": "generate", "structured_outputs": {}}), "invalid_input", "structured_outputs"),
    (json.dumps({"type": "generate", "structured_outputs": {"regex": "Z€Z"}}), "invalid_input", "vocabulary lacks"),
    (json.dumps({"type": "generate", "steer": [{"layer": 9, "unit": 0, "add": 1}]}), "invalid_input", "steer.0.layer"),
    (json.dumps({"type": "generate", "min_p": 2}), "invalid_input", "min_p"),
    (json.dumps({"type": "generate", "type2": 1}), "invalid_input", "type2"),
    (json.dumps({"type": ["generate"]}), "unknown_type", "unknown message type"),
    (json.dumps({"type": "x" * 10_000}), "unknown_type", "unknown message type"),
]


@pytest.mark.parametrize(("message", "code", "fragment"), WS_CASES)
def test_websocket_rejects_and_stays_usable(server: Server, message: str, code: str, fragment: str) -> None:
    with connect(f"{server.ws_url}/v1/stream", max_size=None) as ws:
        ws.send(message)
        reply = json.loads(ws.recv(timeout=30))
        while reply["type"] == "session":
            reply = json.loads(ws.recv(timeout=30))
        assert reply["type"] == "error" and reply["code"] == code and fragment in reply["message"], reply
        assert len(reply["message"]) < 300  # the message names the problem without echoing the input
        ws.send(json.dumps({"type": "generate", "max_new_chars": 3}))
        while (m := json.loads(ws.recv(timeout=30)))["type"] not in ("done", "error"):
            pass
        assert m["type"] == "done", m


def test_nothing_is_left_running_or_leased(server: Server) -> None:
    service = server.app.state.service  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while (service.running or leased_sessions(server)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.running == 0 and leased_sessions(server) == 0

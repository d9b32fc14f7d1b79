"""Per-character annotations: unit activations, top alternatives and prompt logprobs, checked
against the model stepped by hand, and free of any effect on the text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from service.core.engine import Engine
from tests.utils import Server

UNITS = [0, 7, 31]


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> Engine:
    return Engine(models_dir / "tiny-lstm" / "model.onnx")


def stepped_states(engine: Engine, text: str) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """The state after each character and the logits before each, stepping one character at a time."""
    state = engine.zero_state(1)
    states, logits_before = [], []
    logits = None
    for ch in text:
        logits_before.append(logits)
        out, state = engine.run(np.array([[engine.info.vocab_index[ch]]], np.int64), state)
        logits = out[0, -1]
        states.append([s[:, 0].copy() for s in state])
    return states, logits_before


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max()
    return z - np.log(np.exp(z).sum())


def test_activations_match_the_model_stepped_by_hand(server: Server, engine: Engine) -> None:
    prompt = "KING:"
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_new_chars": 40,
        "seed": 3,
        "temperature": 0.9,
        "top_logprobs": 3,
        "logprobs": True,
        "activations": {"layer": 1, "state": "c", "units": UNITS, "prompt": True},
    }
    with server.client() as c:
        plain = c.post("/v1/generate", json={k: body[k] for k in ("prompt", "max_new_chars", "seed", "temperature")})
        annotated = c.post("/v1/generate", json=body).json()
    assert annotated["text"] == plain.json()["text"]  # asking costs nothing in the text
    text = annotated["text"]
    states, logits_before = stepped_states(engine, prompt + text)
    want = np.array([s[1][1, UNITS] for s in states])  # c of layer 1
    got = np.array(annotated["prompt_activations"] + annotated["activations"])
    assert got.shape == (len(prompt) + len(text), len(UNITS))
    np.testing.assert_allclose(got, want, atol=1e-4)
    for i, (lp, top) in enumerate(zip(annotated["logprobs"], annotated["top_logprobs"], strict=True)):
        expected = log_softmax(logits_before[len(prompt) + i])
        assert lp == pytest.approx(expected[engine.info.vocab_index[text[i]]], abs=1e-4)
        assert len(top) == 3 and list(top.values()) == sorted(top.values(), reverse=True)
        best = int(np.argmax(expected))
        assert next(iter(top)) == engine.info.vocab[best]


def test_stop_sequences_and_annotations_stay_aligned(server: Server) -> None:
    body: dict[str, Any] = {"prompt": "ROMEO:", "max_new_chars": 200, "temperature": 0}
    with server.client() as c:
        free = c.post("/v1/generate", json=body).json()["text"]
        stop = free[30:32]
        r = c.post(
            "/v1/generate",
            json=body | {"stop": [stop], "logprobs": True, "activations": {"layer": 0, "units": [1, 2]}},
        ).json()
    assert r["finish_reason"] == "stop" and r["text"] == free[: free.index(stop)]
    assert len(r["activations"]) == len(r["logprobs"]) == len(r["text"])


def test_sse_and_websocket_carry_the_same_annotations(server: Server) -> None:
    body: dict[str, Any] = {
        "prompt": "JULIET:",
        "max_new_chars": 25,
        "seed": 9,
        "top_logprobs": 2,
        "activations": {"layer": 0, "state": "h", "units": [3, 4], "prompt": True},
    }
    with server.client() as c:
        whole = c.post("/v1/generate", json=body).json()
        frames = []
        with c.stream("POST", "/v1/generate", json=body | {"stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    frames.append(json.loads(line[6:]))
    prompt_frame = frames[0]
    assert prompt_frame["prompt"] == "JULIET:" and prompt_frame["activations"] == whole["prompt_activations"]
    texts = [f for f in frames if "text" in f]
    assert "".join(f["text"] for f in texts) == whole["text"]
    assert [a for f in texts for a in f["activations"]] == whole["activations"]
    assert [t for f in texts for t in f["top_logprobs"]] == whole["top_logprobs"]
    with connect(f"{server.ws_url}/v1/stream") as ws:
        ws.send(json.dumps({"type": "generate", **body}))
        messages = []
        while not messages or messages[-1]["type"] not in ("done", "error"):
            messages.append(json.loads(ws.recv(timeout=30)))
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "session" and kinds[1] == "prompt" and kinds[-1] == "done"
    ws_text = [m for m in messages if m["type"] == "text"]
    assert "".join(m["text"] for m in ws_text) == whole["text"]
    assert [a for m in ws_text for a in m["activations"]] == whole["activations"]


def test_session_routes_annotate_and_keep_state(server: Server) -> None:
    """Annotations on a session: the continuation equals one long generation, annotated or not."""
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        long = c.post("/v1/generate", json={"prompt": "A:", "max_new_chars": 40, "seed": 2}).json()["text"]
        sid = c.post("/v1/sessions", json={"prompt": "A:", "seed": 2}).json()["id"]
        act = {"layer": 1, "units": [5], "prompt": True}
        first = c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 20, "activations": act}).json()
        second = c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 20}).json()
    assert first["text"] + second["text"] == long
    assert len(first["activations"]) == 20

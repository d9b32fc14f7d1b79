"""POST /v1/score, feed with logprobs and top_g, and echo with max_tokens 0, on a real server, against the
model's own loss computed independently: exports/run.py stepping one character at a time."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from openai import OpenAI

from exports import run
from tests.utils import SHAKESPEARE, Server

TEXTS = [
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "a",
    "zzzz qqqq xxxx",
    SHAKESPEARE.read_text(encoding="utf-8")[5000:5700],  # longer than a prefill chunk: read in three
]


def stepped_logprobs(
    models_dir: Path, context: str, text: str, model: str = "tiny-lstm", file: str = "model.onnx"
) -> list[tuple[float, int]]:
    """(log-probability, rank among the model's predictions) of each character of `text` after `context`,
    one exports/run.py step per character of the model's `file`."""
    session, vocab, meta = run.load(str(models_dir / model / file))
    index = {c: i for i, c in enumerate(vocab)}
    state = run.zero_state(meta)
    logits = None
    for c in context:
        out, state = run.step(session, np.array([[index[c]]], np.int64), state)
        logits = out[0, -1].astype(np.float64)
    scored = []
    for c in text:
        assert logits is not None
        lps = logits - logits.max()
        lps -= np.log(np.exp(lps).sum())
        scored.append((float(lps[index[c]]), int((lps > lps[index[c]]).sum())))
        out, state = run.step(session, np.array([[index[c]]], np.int64), state)
        logits = out[0, -1].astype(np.float64)
    return scored


def test_scores_equal_the_models_own_loss(server: Server, models_dir: Path) -> None:
    with server.client() as c:
        r = c.post("/v1/score", json={"texts": TEXTS, "logprobs": True})
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["model"] == "tiny-lstm" and len(body["scores"]) == len(TEXTS)
    for text, score in zip(TEXTS, body["scores"], strict=True):
        want = stepped_logprobs(models_dir, "\n", text)
        nll = -sum(lp for lp, _ in want)
        assert score["chars"] == len(text)
        assert abs(score["nats_per_char"] - nll / len(text)) < 1e-3
        assert score["nll"] == pytest.approx(nll, abs=1e-3 * len(text))
        assert score["bits_per_char"] == pytest.approx(score["nats_per_char"] / math.log(2))
        np.testing.assert_allclose(score["logprobs"], [lp for lp, _ in want], atol=1e-4)


def test_context_top_logprobs_and_another_model(server: Server, models_dir: Path) -> None:
    with server.client() as c:
        body = {"model": "tiny-gru", "texts": ["thee and thou"], "context": "KING:\n", "top_logprobs": 3}
        score = c.post("/v1/score", json=body).json()["scores"][0]
    want = stepped_logprobs(models_dir, "KING:\n", "thee and thou", "tiny-gru")
    assert abs(score["nats_per_char"] + sum(lp for lp, _ in want) / 13) < 1e-3
    assert score["logprobs"] is None and len(score["top_logprobs"]) == 13
    assert all(len(top) == 3 for top in score["top_logprobs"])


def test_feed_returns_logprobs_and_the_characters_outside_the_top_g(server: Server, models_dir: Path) -> None:
    text = "ROMEO:\nWhat qxz is this?"
    want = stepped_logprobs(models_dir, "\n", text)
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"prompt": "\n"}).json()["id"]
        fed = c.post(f"/v1/sessions/{sid}/feed", json={"text": text, "logprobs": True, "top_g": 3}).json()
        assert fed["usage"]["prompt_chars"] == len(text)
        np.testing.assert_allclose(fed["logprobs"], [lp for lp, _ in want], atol=1e-4)
        assert fed["outside_top_g"] == [i for i, (_, rank) in enumerate(want) if rank >= 3]
        assert fed["outside_top_g"]  # "qxz" is not what a Shakespeare model expects
        # A fresh session's first character has nothing before it to predict it.
        fresh = c.post("/v1/sessions", json={}).json()["id"]
        first = c.post(f"/v1/sessions/{fresh}/feed", json={"text": "AB", "logprobs": True}).json()
        assert first["logprobs"][0] is None and first["outside_top_g"] is None
        plain = c.post(f"/v1/sessions/{fresh}/feed", json={"text": "C"}).json()
        assert plain["logprobs"] is None and plain["session"]["history_chars"] == 3


def test_echo_with_max_tokens_0_scores_the_prompt_the_same_way(server: Server) -> None:
    prompt = "\n" + TEXTS[0]
    with server.client() as c:
        score = c.post("/v1/score", json={"texts": [TEXTS[0]], "logprobs": True}).json()["scores"][0]
    with OpenAI(base_url=f"{server.base_url}/v1", api_key="any", max_retries=0) as client:
        echo = client.completions.create(model="tiny-lstm", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    lps = echo.choices[0].logprobs
    assert lps is not None and lps.token_logprobs is not None
    assert lps.token_logprobs[0] is None  # the line break: nothing before it
    np.testing.assert_allclose(lps.token_logprobs[1:], score["logprobs"], atol=1e-6)


def read_in_one_call(models_dir: Path, context: str, text: str, file: str) -> list[float]:
    """Each character's log-probability after `context`, the text read in one seq=len(text) call of
    the model's `file` (as the server reads a text shorter than a prefill chunk)."""
    session, vocab, meta = run.load(str(models_dir / "tiny-lstm" / file))
    index = {c: i for i, c in enumerate(vocab)}
    out, state = run.step(session, np.array([[index[c] for c in context]], np.int64), run.zero_state(meta))
    first = out[0, -1:]
    rest, _ = run.step(session, np.array([[index[c] for c in text]], np.int64), state)
    logits = np.concatenate([first, rest[0, :-1]]).astype(np.float64)
    lps = logits - logits.max(axis=1, keepdims=True)
    lps -= np.log(np.exp(lps).sum(axis=1, keepdims=True))
    return [float(lps[i, index[c]]) for i, c in enumerate(text)]


def test_an_int8_server_scores_what_the_int8_file_reads(models_dir: Path) -> None:
    """CHARSTREAM_VARIANT=int8: the server's scores are the int8 file's own, read independently with
    onnxruntime, and not the fp32 file's. The int8 graph quantizes its activations per call (dynamic
    quantization), so its numbers depend on the call's shape: read one character per call they
    differ by up to a few hundredths of a nat (docs: The model format)."""
    from tests.utils import run_server

    context, text = "\n", TEXTS[0]
    int8 = read_in_one_call(models_dir, context, text, "model.int8.onnx")
    fp32 = read_in_one_call(models_dir, context, text, "model.onnx")
    assert max(abs(a - b) for a, b in zip(int8, fp32, strict=True)) > 1e-3  # the two files really differ
    np.testing.assert_allclose(fp32, [lp for lp, _ in stepped_logprobs(models_dir, context, text)], atol=1e-4)
    with run_server(models_dir=models_dir, default_model="tiny-lstm", variant="int8") as s, s.client() as c:
        r = c.post("/v1/score", json={"texts": [text], "context": context, "logprobs": True})
        assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["scores"][0]["logprobs"], int8, atol=1e-4)

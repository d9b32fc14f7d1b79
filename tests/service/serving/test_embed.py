"""POST /v1/embeddings through the official `openai` client against a real server: each vector is
the model's top-layer h after reading the text, stepped independently with exports/run.py, unit
length, as floats or base64, cut to `dimensions`; what cannot be embedded is a 400 naming the field."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import openai
import pytest

from exports import run
from tests.utils import run_server

MODEL = "tiny-lstm"
TEXTS = ["ROMEO: But soft, what light", "a", "To be, or not to be, that is the question"]


def by_hand(models_dir: Path, text: str, dimensions: int | None = None) -> np.ndarray:
    """The top layer's h after "\\n" + text, read in one call of the runner, normalised."""
    session, vocab, meta = run.load(str(models_dir / MODEL / "model.onnx"))
    index = {c: i for i, c in enumerate(vocab)}
    _, state = run.step(session, np.array([[index[c] for c in "\n" + text]], np.int64), run.zero_state(meta))
    h = state[0][-1, 0, :dimensions].astype(np.float64)
    return h / np.linalg.norm(h)


def test_embeddings_are_the_models_final_state(models_dir: Path) -> None:
    with run_server(models_dir=models_dir, default_model=MODEL) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        floats = client.embeddings.create(model=MODEL, input=TEXTS)
        packed = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="base64")
        short = client.embeddings.create(model=MODEL, input=TEXTS[2], dimensions=8)
        with pytest.raises(openai.BadRequestError, match="dimensions"):
            client.embeddings.create(model=MODEL, input="a", dimensions=10_000)
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model=MODEL, input=[[1, 2, 3]])  # token ids: a character model has none
    assert [e.index for e in floats.data] == [0, 1, 2] and floats.model == MODEL
    assert floats.usage.prompt_tokens == sum(len(t) for t in TEXTS)
    for text, item in zip(TEXTS, floats.data, strict=True):
        vector = np.array(item.embedding)
        assert vector.shape == (48,) and np.linalg.norm(vector) == pytest.approx(1, abs=1e-5)
        np.testing.assert_allclose(vector, by_hand(models_dir, text), atol=1e-5)
    # Unasked, the client asks for base64 and decodes it (the floats above came that way); asked for
    # base64, it hands the string on: little-endian float32.
    raw = packed.data[0].embedding
    assert isinstance(raw, str)
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(raw), "<f4"), floats.data[0].embedding, atol=1e-7)
    np.testing.assert_allclose(short.data[0].embedding, by_hand(models_dir, TEXTS[2], 8), atol=1e-5)


def test_base64_is_little_endian_float32(models_dir: Path) -> None:
    with run_server(models_dir=models_dir, default_model=MODEL) as server, server.client() as c:
        r = c.post("/v1/embeddings", json={"model": MODEL, "input": "ROMEO", "encoding_format": "base64"})
        assert r.status_code == 200, r.text
        vector = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4")
        empty = c.post("/v1/embeddings", json={"model": MODEL, "input": ""})
    np.testing.assert_allclose(vector, by_hand(models_dir, "ROMEO"), atol=1e-5)
    assert empty.status_code == 400 and empty.json()["error"]["param"].startswith("input")

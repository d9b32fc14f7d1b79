"""A charstream .onnx file served by LitServe, written the way a LitServe user would write it.

    python -m benchmarks.peers.litserve_server exports/shakespeare-lstm/model.onnx --port 8100
    curl -sN localhost:8100/predict -d '{"prompt": "ROMEO:", "max_new_chars": 100, "seed": 1}'

A peer for the benchmarks only (`benchmarks/peers_bench.py`), never part of the serving image.
It keeps no state between requests: every request reads its whole prompt (one onnxruntime call
with seq = len(prompt)), then steps one character at a time, sampling as charstream does
(temperature, top-k, one uniform draw per character from a seeded PCG64). Requests are batched
the way LitServe offers it for streaming: with max_batch_size > 1 and stream=True, LitServe
collects up to max_batch_size requests within batch_timeout, and `predict` runs them as one
batch until every row is done (a short request's response stays open until then); a request
that arrives meanwhile waits for the next batch.
Characters stream back as LitServe streams, one JSON line per character: {"text": "R"}.

onnxruntime gets the same session options as charstream's server (threads, no spinning), so the
two are compared as servers, not as runtime settings. One inference worker on the CPU, as
LitServe runs by default there.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import litserve as ls
import numpy as np
import onnxruntime as ort
from fastapi import HTTPException

from exports.contract import parse_metadata, session_options


@dataclass
class Request:
    ids: list[int]  # the prompt, as vocabulary indices
    max_new_chars: int
    temperature: float  # 0 = greedy
    top_k: int  # 0 = off
    rng: np.random.Generator


class CharModelAPI(ls.LitAPI):  # type: ignore[misc]
    def __init__(self, model_path: str, threads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_path = model_path
        self.threads = threads

    def setup(self, device: str) -> None:
        self.session = ort.InferenceSession(
            self.model_path, session_options(ort, "fp32", self.threads), providers=["CPUExecutionProvider"]
        )
        info = parse_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.vocab = info.vocab
        self.index = info.vocab_index
        self.state_shape = (info.num_layers, 1, info.hidden_size)  # (layers, batch, hidden)
        self.names = [i.name for i in self.session.get_inputs()]  # tokens, h[, c]

    # LitServe builds the endpoint from the annotations of decode_request's `request` and of
    # encode_response's return: left out, the route reads the JSON body and streams plain chunks.
    def decode_request(self, request) -> Request:
        prompt = request.get("prompt", "\n")
        if not isinstance(prompt, str) or not prompt:
            raise HTTPException(422, "prompt must be a non-empty string")
        unknown = sorted({ch for ch in prompt if ch not in self.index})
        if unknown:
            raise HTTPException(422, f"characters outside the vocabulary: {unknown}")
        return Request(
            ids=[self.index[ch] for ch in prompt],
            max_new_chars=int(request.get("max_new_chars", 256)),
            temperature=float(request.get("temperature", 1.0)),
            top_k=int(request.get("top_k", 0)),
            rng=np.random.default_rng(request.get("seed")),
        )

    def batch(self, inputs: list[Request]) -> list[Request]:
        return inputs

    def predict(self, requests: list[Request]) -> Iterator[list[str]]:
        """One list per step, a character (or "" once a row is done) for every request of the batch."""
        # Prompts differ in length and an RNN cannot be padded without changing its state, so
        # each prompt is read on its own, in one call; the steps after it run as one batch.
        read = [self._run(np.array([r.ids], np.int64), self._zero_state()) for r in requests]
        logits = np.concatenate([out[0][:, -1] for out in read])  # (batch, vocab)
        state = [np.concatenate(parts, axis=1) for parts in zip(*(out[1] for out in read), strict=True)]
        for step in range(max(r.max_new_chars for r in requests)):
            ids = np.array([sample(row, r) for row, r in zip(logits, requests, strict=True)], np.int64)
            yield [self.vocab[i] if step < r.max_new_chars else "" for i, r in zip(ids, requests, strict=True)]
            out, state = self._run(ids[:, None], state)
            logits = out[:, -1]

    def unbatch(self, output: Iterator[list[str]]) -> Iterator[list[str]]:
        yield from output

    def encode_response(self, output: Iterator[list[str]]):
        for chars in output:
            yield [{"text": ch} if ch else "" for ch in chars]

    def _zero_state(self) -> list[np.ndarray]:
        return [np.zeros(self.state_shape, np.float32) for _ in self.names[1:]]

    def _run(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """tokens (batch, seq) -> logits (batch, seq, vocab) and the new state."""
        outputs = self.session.run(None, dict(zip(self.names, [tokens, *state], strict=True)))
        return outputs[0], outputs[1:]


def sample(logits: np.ndarray, request: Request) -> int:
    """The next character: greedy, or one uniform draw by inverse CDF over the (top-k) distribution."""
    if request.temperature <= 0:
        return int(logits.argmax())
    z = logits.astype(np.float64) / request.temperature
    p = np.exp(z - z.max())
    if 0 < request.top_k < p.size:
        p[p < np.sort(p)[-request.top_k]] = 0.0
    cdf = np.cumsum(p)
    target = min(request.rng.random() * cdf[-1], np.nextafter(cdf[-1], 0.0))
    return int((cdf <= target).sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a charstream .onnx file with LitServe (stateless).")
    parser.add_argument("model", help="path to a charstream .onnx file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.01, help="seconds a batch waits to fill")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="onnxruntime threads")
    args = parser.parse_args(argv)
    if args.max_batch_size < 2:
        parser.error("--max-batch-size must be at least 2: predict is written for LitServe's batched streaming")
    api = CharModelAPI(
        args.model,
        args.threads,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        stream=True,
    )
    # timeout: how long a request may wait in the queue; a batch of long generations takes a while.
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=600)
    server.run(host=args.host, port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()

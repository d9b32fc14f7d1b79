"""Reference runner for a charstream .onnx file: numpy + onnxruntime only; with exports/sampling.py
(the sampler the service uses) it is all an edge device needs.

    python -m exports.run model.onnx --prime "ROMEO:" --length 200 --temperature 0.8 --seed 1

The caller owns the recurrent state: each step feeds h_out (and c_out) back as h (and c).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort

from exports.sampling import Sampling


def load(path: str) -> tuple[ort.InferenceSession, list[str], dict[str, str]]:
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own classes for missing or damaged files
        raise ValueError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None
    meta = session.get_modelmeta().custom_metadata_map
    if "vocab" not in meta:
        raise ValueError(f"{path} is not a charstream graph (no vocab in its metadata)")
    return session, json.loads(meta["vocab"]), meta


def zero_state(meta: dict[str, str], batch: int = 1) -> list[np.ndarray]:
    shape = (int(meta["num_layers"]), batch, int(meta["hidden_size"]))
    count = 2 if meta["cell"] == "lstm" else 1  # LSTM carries (h, c); GRU and RNN only h
    return [np.zeros(shape, np.float32) for _ in range(count)]


def step(
    session: ort.InferenceSession, tokens: np.ndarray, state: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """tokens int64 [batch, seq] -> logits [batch, seq, vocab] and the new state."""
    names = [i.name for i in session.get_inputs()]  # tokens, h[, c]
    outputs = session.run(None, dict(zip(names, [tokens, *state], strict=True)))
    return outputs[0], outputs[1:]


def generate(path: str, prime: str, length: int, temperature: float, seed: int | None) -> str:
    sampling = Sampling(temperature=temperature)
    session, vocab, meta = load(path)
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted({ch for ch in prime if ch not in index})
    if unknown:
        raise ValueError(f"--prime has characters outside the vocabulary: {unknown}")
    rng = np.random.default_rng(seed)
    state = zero_state(meta)
    # Prime the whole prompt in one call (seq = len(prime)), then step one character at a time.
    logits, state = step(session, np.array([[index[ch] for ch in prime]], np.int64), state)
    out = []
    for _ in range(length):
        nxt = sampling.sample(logits[0, -1], rng)
        out.append(vocab[nxt])
        logits, state = step(session, np.array([[nxt]], np.int64), state)
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sample text from a charstream .onnx file.")
    parser.add_argument("model")
    parser.add_argument("--prime", default="\n")
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if not args.prime:
            raise ValueError("--prime must hold at least one character")
        if args.length < 0:
            raise ValueError("--length must be at least 0")
        text = generate(args.model, args.prime, args.length, args.temperature, args.seed)
    except (ValueError, OSError) as exc:
        print(
            f"exports.run: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            file=sys.stderr,
        )
        return 2
    print(args.prime + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

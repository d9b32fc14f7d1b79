"""Reference runner for a charstream .onnx file: numpy + onnxruntime only; with exports/sampling.py
(the sampler the service uses) it is all an edge device needs.

    python -m exports.run model.onnx --prime "ROMEO:" --length 200 --temperature 0.8 --seed 1
    python -m exports.run model.onnx --state-in turn.state --prime "" --length 200 --state-out next.state

The caller owns the recurrent state: each step feeds h_out (and c_out) back as h (and c). A
`charstream-state` (exports/state.py; a server's GET /v1/sessions/{id}/state, raw or as its JSON)
picks a conversation up where a server left it, RNG included: one draw per character, as the
server draws, so the continuation is the server's own. `--state-out` hands it on.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from exports import state as portable
from exports.contract import file_sha256
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


@dataclass
class Run:
    text: str
    state: portable.State


def generate(
    path: str,
    prime: str,
    length: int,
    temperature: float,
    seed: int | None,
    start: bytes | None = None,
) -> Run:
    """`length` characters after `prime`, from the zero state or from the state in `start`."""
    sampling = Sampling(temperature=temperature)
    session, vocab, meta = load(path)
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted({ch for ch in prime if ch not in index})
    if unknown:
        raise ValueError(f"--prime has characters outside the vocabulary: {unknown}")
    identity = _identity(path, vocab, meta)
    state, logits, position, last, rng = zero_state(meta), None, 0, None, np.random.default_rng(seed)
    if start is not None:
        held = portable.decode(start)
        portable.check_fits(held, held.model, *identity[1:])
        state = [t[:, None, :].copy() for t in held.tensors]  # (layers, hidden) -> (layers, batch 1, hidden)
        logits = None if held.logits is None else held.logits[None, None, :]
        position, last = held.position, held.last_char
        if seed is None:  # the state's own RNG goes on where it stopped
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = held.rng
    if prime:  # read the whole prompt in one call (seq = len(prime))
        logits, state = step(session, np.array([[index[ch] for ch in prime]], np.int64), state)
        position, last = position + len(prime), prime[-1]
    if logits is None:
        raise ValueError("--prime must hold at least one character: the state has read nothing yet")
    out = []
    for _ in range(length):
        nxt = sampling.sample(logits[0, -1], rng)
        out.append(vocab[nxt])
        logits, state = step(session, np.array([[nxt]], np.int64), state)
    model, weights, vocab_t, cell = identity[:4]
    final = portable.State(
        model=model,
        weights_sha256=weights,
        vocab_sha256=portable.vocab_sha256(vocab_t),
        cell=cell,
        tensors=[t[:, 0, :] for t in state],
        logits=logits[0, -1].astype(np.float32),
        position=position + length,
        last_char=out[-1] if out else last,
        rng=dict(rng.bit_generator.state),
    )
    return Run("".join(out), final)


def _identity(path: str, vocab: list[str], meta: dict[str, str]) -> tuple[str, str, tuple[str, ...], str, int, int]:
    """The model as a state names it: its folder's name (the model id a server gives it), the file's
    sha256, the vocabulary, cell and shapes."""
    model_path = Path(path)
    return (
        model_path.parent.name,
        file_sha256(model_path),
        tuple(vocab),
        meta["cell"],
        int(meta["num_layers"]),
        int(meta["hidden_size"]),
    )


def read_state(path: str) -> bytes:
    """A state file: the raw blob, or the JSON a server's GET /v1/sessions/{id}/state answers."""
    data = Path(path).read_bytes()
    if data[:1] == b"{":
        try:
            return portable.decode_text(str(json.loads(data)["state"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--state-in {path}: not a state's JSON ({exc})") from None
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sample text from a charstream .onnx file.")
    parser.add_argument("model")
    parser.add_argument("--prime", default=None, help="text read first (default: a line break, none after --state-in)")
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--state-in", default=None, help="a charstream-state to continue from (raw, or a server's JSON)"
    )
    parser.add_argument("--state-out", default=None, help="write the final state here (raw charstream-state)")
    args = parser.parse_args(argv)
    try:
        if args.length < 0:
            raise ValueError("--length must be at least 0")
        start = None if args.state_in is None else read_state(args.state_in)
        if args.prime is None:
            args.prime = "" if start is not None else "\n"
        run = generate(args.model, args.prime, args.length, args.temperature, args.seed, start)
        if args.state_out is not None:
            Path(args.state_out).write_bytes(portable.encode(run.state))
    except (ValueError, OSError) as exc:
        print(
            f"exports.run: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            file=sys.stderr,
        )
        return 2
    print(args.prime + run.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

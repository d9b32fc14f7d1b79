"""`charstream-state` v1: a model's recurrent state as a portable, versioned object.

A character model's whole memory of the text it has read is its recurrent state (for the bundled
2x512 LSTM, h and c: 2,048 floats) and the next-character logits that state predicts. This format
carries them, with what is needed to continue exactly (the sampler's RNG) and to refuse a state
that belongs to another model, between a server, a browser and an edge device. Stdlib and numpy
only, like the rest of the artifact contract.

Layout, little-endian:

    magic          b"CSST"                         4 bytes
    version        u16 (VERSION)
    header length  u32
    header         UTF-8 JSON (below)
    tensors        `tensors` x layers x hidden float32: h, then c for an LSTM
    logits         vocab float32, when the header's `has_logits` is true
    signature      32 bytes, when the header's `signed` is true: HMAC-SHA256, under the issuer's
                   key, of every byte before it

Header fields: `format` ("charstream-state"), `version`, `model` (its id), `weights_sha256` (of
the model file whose state this is), `vocab_sha256` (of the vocabulary, one JSON array),
`cell`, `layers`, `hidden`, `tensors`, `vocab`, `dtype` ("float32"), `position` (characters
read), `last_char` (the last one read, or null), `rng` (numpy's PCG64 state: the sampler goes on
where it stopped), `has_logits`, `signed`, and `metadata` (the user's, a JSON object).

In JSON a state travels as base64url without padding (`encode_text`); on its own it is
`application/octet-stream`. `decode` refuses, with a `StateError` saying why: a blob that is not
one, a version it does not read, a truncated or over-long blob, shapes the header does not
describe, non-finite values, and a bad or missing signature where a key is required. Whether
the state fits a given model is `check_fits`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT = "charstream-state"
VERSION = 1
MAGIC = b"CSST"
MEDIA_TYPE = "application/octet-stream"
SIGNATURE_BYTES = 32
_PREFIX = struct.Struct("<4sHI")
MAX_HEADER_BYTES = 64 * 1024  # an RNG state, a few ids and the user's metadata
MAX_METADATA_BYTES = 4 * 1024


class StateError(ValueError):
    """A blob that is not a usable state; the message says why."""


def vocab_sha256(vocab: tuple[str, ...] | list[str]) -> str:
    """The vocabulary's fingerprint: the sha256 of its characters as one JSON array."""
    return hashlib.sha256(json.dumps(list(vocab), ensure_ascii=False).encode()).hexdigest()


@dataclass
class State:
    model: str
    weights_sha256: str
    vocab_sha256: str
    cell: str
    tensors: list[np.ndarray]  # (layers, hidden) float32 each
    logits: np.ndarray | None  # (vocab,) float32: what the state predicts next; None before any input
    position: int
    last_char: str | None
    rng: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return int(self.tensors[0].shape[0])

    @property
    def hidden(self) -> int:
        return int(self.tensors[0].shape[1])


def encode(state: State, key: bytes | None = None) -> bytes:
    """The state's bytes, HMAC-signed under `key` when one is given."""
    metadata = json.dumps(state.metadata, separators=(",", ":"), ensure_ascii=False)
    if len(metadata.encode()) > MAX_METADATA_BYTES:
        raise StateError(f"metadata has {len(metadata.encode())} bytes; at most {MAX_METADATA_BYTES}")
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": state.model,
        "weights_sha256": state.weights_sha256,
        "vocab_sha256": state.vocab_sha256,
        "cell": state.cell,
        "layers": state.layers,
        "hidden": state.hidden,
        "tensors": len(state.tensors),
        "vocab": 0 if state.logits is None else int(state.logits.shape[0]),
        "dtype": "float32",
        "position": state.position,
        "last_char": state.last_char,
        "rng": state.rng,
        "has_logits": state.logits is not None,
        "signed": key is not None,
        "metadata": state.metadata,
    }
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    parts = [_PREFIX.pack(MAGIC, VERSION, len(head)), head]
    parts += [np.ascontiguousarray(t, dtype="<f4").tobytes() for t in state.tensors]
    if state.logits is not None:
        parts.append(np.ascontiguousarray(state.logits, dtype="<f4").tobytes())
    body = b"".join(parts)
    return body + (hmac.new(key, body, hashlib.sha256).digest() if key is not None else b"")


def decode(data: bytes, key: bytes | None = None) -> State:
    """The state in `data`. With `key`, the state must be signed under it; without one, a signature
    is not checked (there is nothing to check it against) and the state is only validated."""
    if len(data) < _PREFIX.size:
        raise StateError(f"a state has at least {_PREFIX.size} bytes; this one has {len(data)}")
    magic, version, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise StateError("not a charstream-state (its first bytes are not CSST)")
    if version != VERSION:
        raise StateError(f"charstream-state version {version}; this reader reads version {VERSION}")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(data):
        raise StateError(f"the header claims {head_len} bytes; the state is truncated or not one")
    header = _header(data[_PREFIX.size : _PREFIX.size + head_len])
    tensors, layers, hidden, vocab = (header[k] for k in ("tensors", "layers", "hidden", "vocab"))
    offset = _PREFIX.size + head_len
    size = layers * hidden * 4
    signed = header["signed"]
    expected = offset + tensors * size + vocab * 4 + (SIGNATURE_BYTES if signed else 0)
    if len(data) != expected:
        cut = "truncated" if len(data) < expected else "over-long"
        raise StateError(f"the state is {cut}: {len(data)} bytes where its header describes {expected}")
    if key is not None:
        if not signed:
            raise StateError("this server takes signed states only (CHARSTREAM_STATE_KEY), and this one is unsigned")
        body = data[: expected - SIGNATURE_BYTES]
        if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), data[len(body) :]):
            raise StateError("the state's signature does not match: it was changed, or signed under another key")
    arrays = [
        np.frombuffer(data, "<f4", layers * hidden, offset + k * size).reshape(layers, hidden).astype(np.float32)
        for k in range(tensors)
    ]
    logits = np.frombuffer(data, "<f4", vocab, offset + tensors * size).astype(np.float32) if vocab else None
    if not all(np.isfinite(a).all() for a in arrays) or (logits is not None and not np.isfinite(logits).all()):
        raise StateError("the state holds values that are not finite (NaN or infinity)")
    return State(
        model=header["model"],
        weights_sha256=header["weights_sha256"],
        vocab_sha256=header["vocab_sha256"],
        cell=header["cell"],
        tensors=arrays,
        logits=logits,
        position=header["position"],
        last_char=header["last_char"],
        rng=header["rng"],
        metadata=header["metadata"],
    )


def _header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"the state's header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StateError("the state's header does not say format charstream-state")
    kinds: dict[str, type | tuple[type, ...]] = {
        "model": str,
        "weights_sha256": str,
        "vocab_sha256": str,
        "cell": str,
        "layers": int,
        "hidden": int,
        "tensors": int,
        "vocab": int,
        "position": int,
        "rng": dict,
        "has_logits": bool,
        "signed": bool,
        "metadata": dict,
    }
    for name, kind in kinds.items():
        value = header.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise StateError(f"the state's header has no valid {name!r}")
    if header.get("dtype") != "float32":
        raise StateError(f"the state's dtype is {header.get('dtype')!r}; version 1 holds float32")
    for name in ("layers", "hidden", "tensors", "vocab", "position"):
        if header[name] < 0 or header[name] > 2**31:
            raise StateError(f"the state's {name} is {header[name]}")
    if header["has_logits"] != (header["vocab"] > 0):
        raise StateError("the state's has_logits and vocab disagree")
    last = header.get("last_char")
    if last is not None and not (isinstance(last, str) and len(last) == 1):
        raise StateError("the state's last_char is not one character")
    return header


def check_fits(
    state: State, model: str, weights_sha256: str, vocab: tuple[str, ...], cell: str, layers: int, hidden: int
) -> None:
    """StateError unless `state` belongs to this model: its id, its weights, vocabulary and shapes."""
    if state.model != model:
        raise StateError(f"the state belongs to model {state.model!r}, not {model!r}")
    if state.weights_sha256 != weights_sha256:
        raise StateError(
            f"the state was made with other weights of model {model!r} (file sha256 {state.weights_sha256[:12]}..., "
            f"this model's is {weights_sha256[:12]}...)"
        )
    if state.vocab_sha256 != vocab_sha256(vocab):
        raise StateError("the state was made with another vocabulary")
    tensors = 2 if cell == "lstm" else 1
    if state.cell != cell or len(state.tensors) != tensors or (state.layers, state.hidden) != (layers, hidden):
        raise StateError(
            f"the state is a {state.cell} of {len(state.tensors)} x {state.layers} x {state.hidden}; "
            f"this model is a {cell} of {tensors} x {layers} x {hidden}"
        )
    if state.logits is not None and state.logits.shape[0] != len(vocab):
        raise StateError(f"the state's logits have {state.logits.shape[0]} entries; the vocabulary {len(vocab)}")


def encode_text(blob: bytes) -> str:
    """A state's bytes as base64url without padding, for JSON."""
    return base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii")


def decode_text(text: str) -> bytes:
    """The bytes of a base64url state (padding optional)."""
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise StateError("the state is not base64url") from None

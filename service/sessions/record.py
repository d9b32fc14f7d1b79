"""A session as a versioned binary record, for stores outside the process (Redis).

Layout (little-endian):

    magic  b"CSR1"          4 bytes
    version                 u16   (RECORD_VERSION)
    header length           u32
    header                  UTF-8 JSON: id, model, model_sha256, seed, history_chars, created_at,
                            rng_state (numpy PCG64 state), tensors, layers, hidden, vocab,
                            has_logits, last_char (when one was read), owner (the key's name;
                            absent in records of a server without keys, and in those written
                            before keys had sessions)
    state                   tensors x layers x hidden float32
    logits                  vocab float32 (when has_logits)

A record is only ever used by the model file it was made with: a record for another model, or
for another version of it (a different sha256: retrained, re-exported, another variant), is
refused with a clear error rather than read into the wrong weights. A record that does not
parse is reported as corrupt, never as a server error.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from service.errors import CorruptSession, ForeignSession
from service.sessions.store import Session, model_swapped

MAGIC = b"CSR1"
RECORD_VERSION = 1
_PREFIX = struct.Struct("<4sHI")


def encode(session: Session, model_sha256: str) -> bytes:
    layers, hidden = session.state[0].shape
    header = {
        "id": session.id,
        "model": session.model,
        "model_sha256": model_sha256,
        "seed": session.seed,
        "history_chars": session.history_chars,
        "created_at": session.created_at,
        "rng_state": session.rng_state,
        "tensors": len(session.state),
        "layers": layers,
        "hidden": hidden,
        "vocab": 0 if session.logits is None else int(session.logits.shape[0]),
        "has_logits": session.logits is not None,
    }
    if session.owner:
        header["owner"] = session.owner
    if session.last_char:
        header["last_char"] = session.last_char
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = [_PREFIX.pack(MAGIC, RECORD_VERSION, len(head)), head]
    parts += [np.ascontiguousarray(s, dtype="<f4").tobytes() for s in session.state]
    if session.logits is not None:
        parts.append(np.ascontiguousarray(session.logits, dtype="<f4").tobytes())
    return b"".join(parts)


def decode(data: bytes, models: dict[str, str]) -> Session:
    """The session in `data`; `models` maps each model this process serves to its file's sha256."""
    try:
        magic, version, head_len = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise ValueError("not a session record")
        if version != RECORD_VERSION:
            raise ValueError(f"record version {version}; this server reads version {RECORD_VERSION}")
        start = _PREFIX.size
        header: dict[str, Any] = json.loads(data[start : start + head_len])
        tensors, layers, hidden, vocab = (int(header[k]) for k in ("tensors", "layers", "hidden", "vocab"))
        offset = start + head_len
        size = layers * hidden * 4
        expected = offset + tensors * size + (vocab * 4 if header["has_logits"] else 0)
        if len(data) != expected:
            raise ValueError(f"record has {len(data)} bytes, its header describes {expected}")
        state = [
            np.frombuffer(data, "<f4", layers * hidden, offset + k * size).reshape(layers, hidden).astype(np.float32)
            for k in range(tensors)
        ]
        logits = np.frombuffer(data, "<f4", vocab, offset + tensors * size).astype(np.float32) if vocab else None
        session = Session(
            id=str(header["id"]),
            model=str(header["model"]),
            seed=int(header["seed"]),
            state=state,
            rng_state=header["rng_state"],
            logits=logits,
            history_chars=int(header["history_chars"]),
            created_at=float(header["created_at"]),
            model_sha256=str(header["model_sha256"]),
            owner=str(header.get("owner", "")),
            last_char=str(header.get("last_char", "")),
        )
        sha = session.model_sha256
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise CorruptSession(f"the stored session cannot be read ({exc}); delete it and start a new one") from None
    if session.model not in models:
        raise ForeignSession(
            f"session {session.id!r} belongs to model {session.model!r}, which this server does not serve",
            field="session_id",
        )
    if models[session.model] != sha:
        raise model_swapped(session, models[session.model])
    return session

"""The prompt-state cache: the recurrent state after a prompt's prefix, so a repeated prefix is read once.

A stateless request whose prompt begins with text read before starts from the state after the
longest cached prefix and reads only the rest. States are kept where the scheduler's chunked
prefill leaves them, after every `chunk` characters (and after a whole prompt), so a prefix
read from the cache ends where reading it would have ended, and the rest is read in the same
chunks as without the cache: the output is the same for the same seed.

Keys are digests of the model file's sha256 and the prefix's character ids; an entry is the
state (a few kilobytes: layers x hidden floats per state tensor) and the next-character logits.
The cache is bounded in bytes, least recently used first out, one per server process. The
scheduler's step thread puts states while the event loop looks them up, so one lock guards it.
With a Redis session store, `SharedStates` adds a second tier that every process shares.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from exports.contract import ModelInfo

log = logging.getLogger("charstream.prompt_cache")

# Per entry beside its arrays: the key, the OrderedDict node, the entry and array objects.
ENTRY_OVERHEAD = 400


@dataclass(frozen=True)
class CachedState:
    state: tuple[np.ndarray, ...]  # (layers, hidden) per state tensor
    logits: np.ndarray  # (vocab,) the next character's logits after the prefix
    nbytes: int


@dataclass(frozen=True)
class PrefixPlan:
    """One prompt's look-up: where reading starts, from which state, and the digests to keep states under."""

    start: int  # characters of the prompt the cached state has read (0: a miss)
    hit: CachedState | None
    digests: dict[int, bytes]  # prompt position -> key, at each chunk boundary past `start` and at the end


def prefix_digests(model_sha256: str, ids: list[int], chunk: int) -> dict[int, bytes]:
    """The key of every prefix the cache may hold for this prompt: each multiple of `chunk`, and the whole.

    The chunk size is part of the key: a state read in other chunks differs in its last bits, and
    replicas that share the cache through Redis may be set up with other chunk sizes."""
    h = hashlib.blake2b(f"{model_sha256}/{chunk}".encode(), digest_size=20)
    data = np.asarray(ids, np.int32)
    out: dict[int, bytes] = {}
    read = 0
    for end in [*range(chunk, len(ids) + 1, chunk), len(ids)]:
        if end > read:
            h.update(data[read:end].tobytes())  # one stream over the ids: a prefix's key is the same in any prompt
            read = end
            out[end] = h.copy().digest()
    return out


class PromptCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, CachedState] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def plan(self, model_sha256: str, ids: list[int], chunk: int) -> PrefixPlan:
        """The longest cached prefix of `ids` (the whole prompt, else a chunk boundary), and the keys to fill."""
        digests = prefix_digests(model_sha256, ids, chunk)
        with self._lock:
            for end in sorted(digests, reverse=True):
                found = self._entries.get(digests[end])
                if found is not None:
                    self._entries.move_to_end(digests[end])
                    return PrefixPlan(end, found, {p: d for p, d in digests.items() if p > end})
        return PrefixPlan(0, None, digests)

    def put(self, key: bytes, state: list[np.ndarray], logits: np.ndarray) -> None:
        """Keep a copy of the state after a prefix; the least recently used entries make room."""
        copied = tuple(s.copy() for s in state)
        entry = CachedState(copied, logits.copy(), sum(s.nbytes for s in copied) + logits.nbytes + ENTRY_OVERHEAD)
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._entries[key] = entry
            self.bytes += entry.nbytes
            while self.bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped.nbytes

    def keeper(
        self, plan: PrefixPlan, shared: SharedStates | None = None, loop: asyncio.AbstractEventLoop | None = None
    ) -> Callable[[int, list[np.ndarray], np.ndarray], None] | None:
        """What the scheduler calls after each chunk it reads: keep the state if that position has a key
        (in this process, and through `shared` on `loop` when given).

        Positions it is called with count from the start of what the job reads, which is `plan.start`.
        """
        if not plan.digests:
            return None
        offset, digests = plan.start, plan.digests

        def keep(read: int, state: list[np.ndarray], logits: np.ndarray) -> None:
            key = digests.get(offset + read)
            if key is not None:
                self.put(key, state, logits)
                if shared is not None and loop is not None:
                    shared.write_soon(loop, key, encode(state, logits))

        return keep


class SharedStates:
    """The cache's second tier, with a Redis session store: prefix states in Redis, for every worker and replica.

    A request that finds no longer prefix in its own process asks Redis for all of its prefixes in
    one MGET and takes the longest found. States read are written in the background as they are
    kept locally, and expire after `ttl_s`. Redis being away costs nothing but the hit: a failed
    read or write is logged and the prompt is read as without the cache.
    """

    def __init__(self, client: Any, ttl_s: float, prefix: str = "charstream:prompt:") -> None:
        self.client = client  # redis.asyncio.Redis
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.prefix = prefix
        self._writes: set[asyncio.Task[None]] = set()

    def _key(self, digest: bytes) -> str:
        return self.prefix + digest.hex()

    async def longest(self, digests: dict[int, bytes], info: ModelInfo) -> tuple[int, CachedState] | None:
        """The longest of these prefixes Redis holds, and its state; None when it holds none (or is away)."""
        ends = sorted(digests, reverse=True)
        try:
            values = await self.client.mget([self._key(digests[end]) for end in ends])
        except Exception as exc:  # redis-py's connection and timeout errors: a miss, never a failed request
            log.warning("shared prompt states not read", extra={"error": str(exc)[:200]})
            return None
        for end, value in zip(ends, values, strict=True):
            state = None if value is None else decode(value, info)
            if state is not None:
                return end, state
        return None

    def write_soon(self, loop: asyncio.AbstractEventLoop, digest: bytes, payload: bytes) -> None:
        """Called from the step thread: the write runs on the event loop."""
        loop.call_soon_threadsafe(self._write, digest, payload)

    def _write(self, digest: bytes, payload: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._set(digest, payload))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _set(self, digest: bytes, payload: bytes) -> None:
        try:
            await self.client.set(self._key(digest), payload, px=self.ttl_ms)
        except Exception as exc:
            log.warning("shared prompt state not written", extra={"error": str(exc)[:200]})


def encode(state: list[np.ndarray], logits: np.ndarray) -> bytes:
    """A state and its logits as float32 bytes, in the contract's order (h, then c), logits last."""
    return b"".join(np.ascontiguousarray(a, np.float32).tobytes() for a in [*state, logits])


def decode(data: bytes, info: ModelInfo) -> CachedState | None:
    """`encode`'s bytes back as a state of this model; None when they do not have its shape."""
    layers, hidden = info.state_shape_per_row
    tensors, per_tensor = len(info.state_names), layers * hidden
    floats = np.frombuffer(data, np.float32)
    if floats.size != tensors * per_tensor + info.vocab_size:
        return None
    state = tuple(floats[k * per_tensor : (k + 1) * per_tensor].reshape(layers, hidden).copy() for k in range(tensors))
    logits = floats[tensors * per_tensor :].copy()
    return CachedState(state, logits, len(data) + ENTRY_OVERHEAD)

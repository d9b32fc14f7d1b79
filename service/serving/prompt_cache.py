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
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

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
    """The key of every prefix the cache may hold for this prompt: each multiple of `chunk`, and the whole."""
    h = hashlib.blake2b(model_sha256.encode(), digest_size=20)
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

    def keeper(self, plan: PrefixPlan) -> Callable[[int, list[np.ndarray], np.ndarray], None] | None:
        """What the scheduler calls after each chunk it reads: keep the state if that position has a key.

        Positions it is called with count from the start of what the job reads, which is `plan.start`.
        """
        if not plan.digests:
            return None
        offset, digests = plan.start, plan.digests

        def keep(read: int, state: list[np.ndarray], logits: np.ndarray) -> None:
            key = digests.get(offset + read)
            if key is not None:
                self.put(key, state, logits)

        return keep

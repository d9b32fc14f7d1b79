"""The corpus index behind `--novel`: which texts occur in the training corpus as a whole sample.

The corpus is cut into samples the way generation cuts its output (at the `--until` string, a line
break by default), and each sample is kept as an 8-byte digest. The index is built once per corpus
and separator and saved beside the model (`novelty/<key>.npy`), so the next run loads it in
milliseconds; the key is the sha256 of the corpus's bytes and the separator, so an edited corpus
gets a new index and never an old one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

FOLDER = "novelty"


def digest(text: str) -> int:
    """An 8-byte digest of a sample: 2^-64 per pair of a false match, far below one in a corpus."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def index_key(corpus: bytes, separator: str) -> str:
    h = hashlib.sha256(corpus)
    h.update(b"\0" + separator.encode("utf-8"))
    return h.hexdigest()[:32]


class NoveltyIndex:
    """A set of sample digests: `text in index` says whether the corpus holds `text` as a sample."""

    def __init__(self, digests: np.ndarray, path: Path | None, built: bool) -> None:
        self._digests = set(digests.tolist())
        self.size = len(self._digests)
        self.path = path  # where it is kept (None: it could not be saved beside the model)
        self.built = built  # built by this run rather than loaded

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and digest(text) in self._digests

    @classmethod
    def open(cls, corpus: Path, separator: str, beside: Path) -> NoveltyIndex:
        """The index of `corpus` cut at `separator`, loaded from `beside/novelty/` or built and saved there."""
        data = corpus.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"--novel: {corpus} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        path = beside / FOLDER / f"{index_key(data, separator)}.npy"
        if path.exists():
            return cls(np.load(path), path, built=False)
        pieces = text.split(separator)
        if pieces and not pieces[-1]:
            pieces.pop()  # a file that ends with the separator has no empty sample after it
        digests = np.unique(np.array([digest(s) for s in pieces], np.uint64))
        try:
            _save(path, digests)
        except OSError:
            return cls(digests, None, built=True)  # a read-only model folder: used for this run only
        return cls(digests, path, built=True)


def _save(path: Path, digests: np.ndarray) -> None:
    """Written to a temporary file and renamed, so a concurrent run never loads half an index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, digests)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

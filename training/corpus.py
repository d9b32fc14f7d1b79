"""Reading UTF-8 corpora, the character vocabulary, and the train/validation split."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from training.errors import InvalidSetting, UserError


@dataclass(frozen=True)
class Vocabulary:
    """The sorted set of Unicode characters of a corpus; a token id is an index into `chars`."""

    chars: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.chars:
            raise UserError("vocabulary is empty")
        if any(len(ch) != 1 for ch in self.chars):
            raise UserError("vocabulary entries must be single characters")
        if len(set(self.chars)) != len(self.chars):
            raise UserError("vocabulary has duplicate characters")
        # A dict lookup per character, built once.
        object.__setattr__(self, "_index", {ch: i for i, ch in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        return cls(tuple(sorted(set(text))))

    @classmethod
    def from_json(cls, data: Sequence[str]) -> Vocabulary:
        return cls(tuple(data))

    def to_json(self) -> list[str]:
        return list(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def index(self) -> dict[str, int]:
        return self._index  # type: ignore[attr-defined,no-any-return]

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` that are not in the vocabulary, in order of first appearance."""
        seen: dict[str, None] = {}
        for ch in text:
            if ch not in self.index:
                seen.setdefault(ch, None)
        return list(seen)

    def encode(self, text: str) -> list[int]:
        missing = self.unknown(text)
        if missing:
            shown = ", ".join(repr(ch) for ch in missing[:10])
            raise UserError(f"text has {len(missing)} character(s) outside the vocabulary: {shown}")
        index = self.index
        return [index[ch] for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)


@dataclass(frozen=True)
class Corpus:
    """A whole training text, where it came from, and its fingerprint."""

    text: str
    name: str
    sha256: str

    def split(self, val_fraction: float) -> tuple[str, str]:
        """Train and validation text: the last `val_fraction` of the characters is validation."""
        if not 0.0 < val_fraction < 1.0:
            raise InvalidSetting(
                f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}", ("val_fraction",)
            )
        n_val = int(len(self.text) * val_fraction)
        if n_val < 2:
            raise InvalidSetting(
                f"corpus of {len(self.text)} characters leaves no validation text at val_fraction {val_fraction}",
                ("val_fraction",),
            )
        cut = len(self.text) - n_val
        return self.text[:cut], self.text[cut:]


def _files_under(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"data folder {path} holds no files")
        return files
    if path.is_file():
        return [path]
    raise UserError(f"data path {path} does not exist")


def read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not valid UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})") from None


def read_corpus(paths: Sequence[str | Path]) -> Corpus:
    """Concatenate one or more UTF-8 files, or every file under a directory, in sorted order."""
    if not paths:
        raise UserError("no data path given")
    files: list[Path] = []
    for p in paths:
        files.extend(_files_under(Path(p)))
    text = "".join(read_text_file(f) for f in files)
    if not text:
        raise UserError(f"corpus {', '.join(str(p) for p in paths)} is empty")
    name = Path(paths[0]).name if len(paths) == 1 else f"{Path(paths[0]).name}+{len(paths) - 1}"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Corpus(text=text, name=name, sha256=digest)

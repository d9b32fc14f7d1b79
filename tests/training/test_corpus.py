from __future__ import annotations

from pathlib import Path

import pytest

from training.corpus import Vocabulary, read_corpus
from training.errors import UserError


def test_vocabulary_is_sorted_unicode_characters_and_round_trips() -> None:
    text = "héllo wörld — 你好，世界 🙂\n"
    vocab = Vocabulary.from_text(text)
    assert list(vocab.chars) == sorted(set(text))
    assert all(len(ch) == 1 for ch in vocab.chars)  # characters, not bytes
    assert vocab.decode(vocab.encode(text)) == text
    assert Vocabulary.from_json(vocab.to_json()) == vocab


def test_thousands_of_distinct_characters() -> None:
    text = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 3000)) * 2
    vocab = Vocabulary.from_text(text)
    assert len(vocab) == 3000
    assert vocab.decode(vocab.encode(text)) == text


def test_encode_names_unknown_characters() -> None:
    vocab = Vocabulary.from_text("abc")
    with pytest.raises(UserError, match=r"2 character\(s\) outside the vocabulary: 'x', 'é'"):
        vocab.encode("abxéx")


def test_reads_one_file_several_files_and_a_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("world", encoding="utf-8")
    (tmp_path / "d" / "a.txt").write_text("hello ", encoding="utf-8")
    (tmp_path / "d" / ".hidden").write_text("skip me", encoding="utf-8")
    assert read_corpus([tmp_path / "d" / "a.txt"]).text == "hello "
    assert read_corpus([tmp_path / "d" / "a.txt", tmp_path / "d" / "b.txt"]).text == "hello world"
    corpus = read_corpus([tmp_path / "d"])
    assert corpus.text == "hello world"
    assert corpus.name == "d"


def test_split_keeps_last_fraction_for_validation() -> None:
    from training.corpus import Corpus

    c = Corpus(text="".join(str(i % 10) for i in range(1000)), name="x", sha256="")
    train, val = c.split(0.1)
    assert len(val) == 100 and train + val == c.text


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"ok \xff\xfe bad", "is not valid UTF-8 \\(byte 3")],
)
def test_bad_corpus_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_corpus([path])


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        read_corpus([tmp_path / "nope.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no files"):
        read_corpus([tmp_path / "empty"])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_bad_validation_fraction(fraction: float) -> None:
    from training.corpus import Corpus

    with pytest.raises(UserError, match="val_fraction must be between 0 and 1"):
        Corpus(text="abcdefgh" * 10, name="x", sha256="").split(fraction)

"""The `charstream` command end to end, as a user runs it: one-line errors, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import REPO


def charstream(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "charstream_cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in lines[0], lines[0]


def test_train_sample_eval(tmp_path: Path, corpus_file: Path) -> None:
    out = tmp_path / "run"
    result = charstream(
        "train",
        "--data",
        str(corpus_file),
        "--out",
        str(out),
        "--max-steps",
        "20",
        "--hidden-size",
        "16",
        "--batch-size",
        "8",
        "--seq-len",
        "16",
        "--eval-interval",
        "10",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "best val loss" in result.stdout
    sample = charstream("sample", str(out / "best.pt"), "--prime", "ROMEO:", "--length", "40", "--seed", "3")
    assert sample.returncode == 0 and sample.stdout.startswith("ROMEO:") and len(sample.stdout) >= 46
    again = charstream("sample", str(out / "best.pt"), "--prime", "ROMEO:", "--length", "40", "--seed", "3")
    assert again.stdout == sample.stdout
    ev = charstream("eval", str(out / "best.pt"), "--data", str(corpus_file))
    assert ev.returncode == 0 and "nats/char" in ev.stdout and "bits/char" in ev.stdout


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "is empty"),
        (b"abc\xffdef" * 100, "not valid UTF-8"),
        (b"a tiny corpus. " * 7, "shorter than one training window"),
    ],
)
def test_train_bad_corpus(tmp_path: Path, content: bytes, fragment: str) -> None:
    data = tmp_path / "corpus.txt"
    data.write_bytes(content)
    assert_one_line_error(charstream("train", "--data", str(data), "--out", str(tmp_path / "o")), fragment)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--num-layers", "0"], "num_layers must be at least 1"),
        (["--lr", "-0.001"], "lr must be positive"),
        (["--cell", "tanh"], "cell must be one of lstm, gru, rnn"),
        (["--dropout", "2"], "dropout must be in"),
        (["--embedding-dropout", "1"], "embedding_dropout must be in"),
        (["--hidden-size", "0"], "hidden_size must be at least 1"),
        (["--embedding-size", "0"], "embedding_size must be at least 1"),
        (["--cell", "rnn", "--forget-bias", "1"], "forget_bias needs a gated cell"),
        (["--batch-size", "5000"], "too short for batch_size 5000 x seq_len 128"),
        (["--val-fraction", "1.5"], "val_fraction must be between 0 and 1"),
        (["--precision", "fp8"], "precision must be one of auto, fp32, bf16, fp16"),
        (["--eval-chars", "-1"], "eval_chars must be at least 0"),
        (["--freeze-layers", "1"], "freeze_layers needs init_from"),
        (["--init-from", "/no/such/model.pt"], "init_from /no/such/model.pt does not exist"),
        # The flags' earlier names still set the same settings.
        (["--layers", "0"], "num_layers must be at least 1"),
        (["--hidden", "0"], "hidden_size must be at least 1"),
        (["--embedding", "0"], "embedding_size must be at least 1"),
    ],
)
def test_train_nonsense_hyper_parameters(tmp_path: Path, corpus_file: Path, args: list[str], fragment: str) -> None:
    result = charstream("train", "--data", str(corpus_file), "--out", str(tmp_path / "o"), *args)
    assert_one_line_error(result, fragment)


def test_train_flags_name_the_settings_and_keep_their_earlier_names() -> None:
    """--num-layers, --hidden-size, --embedding-size as the manifest names them; --layers, --hidden, --embedding too."""
    import argparse

    from exports.cli import config_from
    from training.cli import COMMANDS
    from training.config import TrainConfig

    parser = argparse.ArgumentParser()
    COMMANDS["train"](parser)
    sizes = ("3", "40", "8")
    for flags in (("--num-layers", "--hidden-size", "--embedding-size"), ("--layers", "--hidden", "--embedding")):
        argv = ["--data", "corpus.txt", *(x for pair in zip(flags, sizes, strict=True) for x in pair)]
        cfg = config_from(TrainConfig, parser.parse_args(argv))
        assert (cfg.num_layers, cfg.hidden_size, cfg.embedding_size) == (3, 40, 8)


def test_sample_bad_inputs(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    ckpt = str(checkpoints["lstm"])
    assert_one_line_error(charstream("sample", ckpt, "--prime", "héllo€"), "outside the vocabulary: 'é', '€'")
    assert_one_line_error(charstream("sample", str(tmp_path / "none.pt")), "does not exist")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 64)
    assert_one_line_error(charstream("sample", str(corrupt)), "corrupt or not a checkpoint")
    assert_one_line_error(charstream("eval", str(corrupt), "--data", str(corrupt)), "corrupt or not a checkpoint")


def test_export_bad_inputs(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    ckpt = str(checkpoints["gru"])
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_one_line_error(charstream("export", ckpt, "--out", str(a_file)), "exists and is not a folder")
    assert_one_line_error(
        charstream("export", ckpt, "--out", str(tmp_path / "o"), "--variants", "fp32,int4"),
        "unknown variant 'int4'",
    )
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"PK\x03\x04 not torch")
    assert_one_line_error(
        charstream("export", str(foreign), "--out", str(tmp_path / "o")),
        "corrupt or not a checkpoint",
    )
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_generate_writes_samples_with_a_bar_and_a_summary(tmp_path: Path, models_dir: Path) -> None:
    out = tmp_path / "s.jsonl"
    args = ["generate", str(models_dir / "tiny-gru"), "--n", "50", "--until", "\n", "--unique", "--seed", "2"]
    result = charstream(*args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "50/50" in result.stderr  # the progress bar
    assert "50 samples, 50 unique" in result.stderr.splitlines()[-1] and "chars/s" in result.stderr
    assert len(out.read_text().splitlines()) == 50
    to_stdout = charstream(*args, "--no-progress")
    assert to_stdout.stdout == out.read_text()


def test_generate_bad_inputs(tmp_path: Path, models_dir: Path) -> None:
    model = str(models_dir / "tiny-lstm")
    assert_one_line_error(charstream("generate", model, "--n", "0"), "--n must be at least 1")
    assert_one_line_error(charstream("generate", model, "--n", "5", "--top-p", "0"), "--top-p")
    assert_one_line_error(charstream("generate", str(tmp_path), "--n", "5"), "MODEL")
    assert_one_line_error(charstream("generate", model, "--n", "5", "--prompt", "\u2603"), "--prompt")
    assert_one_line_error(charstream("generate", model, "--n", "5", "--shard", "2/2"), "--shard")
    out = tmp_path / "s.jsonl"
    assert charstream("generate", model, "--n", "5", "--out", str(out), "--no-progress").returncode == 0
    assert_one_line_error(charstream("generate", model, "--n", "5", "--out", str(out)), "--resume")
    bad_shard = charstream("generate", model, "--n", "5", "--shard", "half")
    assert bad_shard.returncode == 2 and "i/N" in bad_shard.stderr and "Traceback" not in bad_shard.stderr
    assert_one_line_error(charstream("generate", model, "--n", "5", "--json", "{not json"), "--json")
    assert_one_line_error(charstream("generate", model, "--n", "5", "--grammar", "@/nonexistent.lark"), "nonexistent")
    assert_one_line_error(charstream("generate", model, "--n", "5", "--regex", "(a|b"), "--regex")


def test_generate_structured_outputs(tmp_path: Path, models_dir: Path) -> None:
    import json
    import re

    out = tmp_path / "names.jsonl"
    result = charstream(
        "generate", str(models_dir / "tiny-lstm"), "--n", "20", "--regex", "[A-Z][a-z]{3,8}", "--unique",
        "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(set(texts)) == 20 and all(re.fullmatch("[A-Z][a-z]{3,8}", t) for t in texts)

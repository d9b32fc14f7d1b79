"""Validation: the whole split, or a fixed, bounded sample of it (--eval-chars) during training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.utils import tiny_train_config
from training.checkpoint import load_model
from training.corpus import read_corpus
from training.evaluate import SAMPLE_MIN_LANE, eval_lanes, evaluate, sample_lanes
from training.train import train


def test_the_sample_is_fixed_bounded_and_spread_over_the_split() -> None:
    ids = torch.arange(1_000_000) % 97
    x, y = sample_lanes(ids, 250_000)
    assert x.shape == (32, 7812) and x.numel() <= 250_000
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the next characters of each lane
    again_x, _ = sample_lanes(ids, 250_000)
    assert torch.equal(x, again_x)
    # Lanes start across the whole split, the last one ending near its end.
    positions = torch.arange(1_000_000)
    px, _ = sample_lanes(positions, 250_000)
    assert px[0, 0] == 0 and px[-1, -1] >= 1_000_000 - 1_000
    # A small bound keeps long lanes (fewer of them) rather than many short ones.
    small, _ = sample_lanes(ids, 5_000)
    assert small.shape == (2, 2_500) and small.shape[1] >= SAMPLE_MIN_LANE


def test_a_bound_at_or_past_the_split_reads_all_of_it(checkpoints: dict[str, Path], corpus_file: Path) -> None:
    model, vocab, _ = load_model(checkpoints["lstm"])
    _, val = read_corpus([corpus_file]).split(0.1)
    ids = torch.tensor(vocab.encode(val))
    full_loss, full_chars = evaluate(model, ids)
    assert full_chars == eval_lanes(ids)[1].numel()
    assert evaluate(model, ids, max_chars=len(val) + 10) == (full_loss, full_chars)
    assert evaluate(model, ids, max_chars=0) == (full_loss, full_chars)
    sample_loss, sample_chars = evaluate(model, ids, max_chars=4096)
    assert sample_chars == 4096 and sample_loss == pytest.approx(full_loss, abs=0.25)
    assert evaluate(model, ids, max_chars=4096) == (sample_loss, sample_chars)


def test_training_validates_on_the_sample_and_finally_on_the_whole_split(
    tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train(tiny_train_config(corpus_file, tmp_path, max_steps=30, eval_interval=10, eval_chars=4096, progress=True))
    said = capsys.readouterr()
    assert "validates every 10 steps on a fixed sample of 4,096 of the 11,999 validation chars" in said.out
    assert "validating" in said.err  # the validation progress bar
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validated = [(r["step"], r["val_chars"]) for r in rows if "val_loss" in r]
    assert validated == [(10, 4096), (20, 4096), (30, 8 * (11_999 // 8))]

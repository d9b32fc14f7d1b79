"""Mixed precision: bf16 autocast for the forward pass and the loss, fp32 everything that is kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.utils import bf16_cell, tiny_train_config
from training.calibrate import choose
from training.checkpoint import load_checkpoint, load_model
from training.corpus import read_corpus
from training.errors import InvalidSetting
from training.evaluate import evaluate_loss, unigram_entropy
from training.precision import cannot_run, resolve
from training.train import train


def test_auto_keeps_the_fastest_unless_within_five_percent_of_fp32() -> None:
    assert choose({"fp32": 1.0, "bf16": 0.6}) == "bf16"
    assert choose({"fp32": 1.0, "bf16": 0.96}) == "fp32"  # 4% is not worth bf16's rounding
    assert choose({"fp32": 1.0, "bf16": 1.7}) == "fp32"
    assert choose({"fp32": 1.0, "bf16": 0.9, "fp16": 0.5}) == "fp16"
    assert resolve("auto", torch.device("cpu")).name == "fp32"  # nothing to measure
    assert resolve("fp32", torch.device("cpu")).dtype is None
    assert resolve("bf16", torch.device("cpu"), bf16_cell()).dtype == torch.bfloat16


def test_auto_measures_the_runs_own_model_once_and_says_so(corpus_file: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The first run measures every candidate on its model and batch and records it in its folder;
    the next run of the same shape reads the cache; neither changes the run's weights or randomness."""
    cfg = tiny_train_config(corpus_file, tmp_path / "a", precision="auto", max_steps=2, eval_interval=2)
    train(cfg)
    said = capsys.readouterr().out
    assert "precision " in said and "auto: measured fp32 " in said and "ms/step" in said
    record = json.loads((tmp_path / "a" / "precision.json").read_text())
    assert "fp32" in record["seconds_per_step"] and record["chosen"] == choose(record["seconds_per_step"])
    assert set(record["seconds_per_step"]) | set(record["skipped"]) == {"fp32", "bf16"}
    again = tiny_train_config(corpus_file, tmp_path / "b", precision="auto", max_steps=2, eval_interval=2)
    train(again)
    assert "auto: cached measurement" in capsys.readouterr().out
    fixed = tiny_train_config(corpus_file, tmp_path / "c", precision=record["chosen"], max_steps=2, eval_interval=2)
    train(fixed)
    first, fixed_run = (load_checkpoint(tmp_path / d / "last.pt") for d in ("a", "c"))
    assert first["precision"] == fixed_run["precision"] == record["chosen"]
    assert all(torch.equal(first["model_state"][k], fixed_run["model_state"][k]) for k in first["model_state"])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_bf16_is_refused_with_the_reason_where_the_cell_cannot_run_it(cell: str) -> None:
    """Where this CPU's kernels lack a bf16 version of the cell, asking for bf16 is a one-line
    refusal naming the cell, and auto keeps fp32; where they have one, bf16 is granted."""
    why = cannot_run("bf16", torch.device("cpu"), cell)
    if why is None:
        assert resolve("bf16", torch.device("cpu"), cell).name == "bf16"
        return
    with pytest.raises(InvalidSetting, match=f"cannot train a {cell} in it: "):
        resolve("bf16", torch.device("cpu"), cell)
    assert resolve("auto", torch.device("cpu"), cell).name == "fp32"


def test_bf16_trains_with_fp32_weights_optimizer_state_and_checkpoints(
    tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train(
        tiny_train_config(corpus_file, tmp_path, cell=bf16_cell(), precision="bf16", max_steps=100, eval_interval=100)
    )
    assert "precision bf16 (bf16 autocast, fp32 weights; as asked)" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["precision"] == "bf16"
    assert all(t.dtype == torch.float32 for t in ckpt["model_state"].values())
    moments = [t for s in ckpt["optimizer_state"]["state"].values() for k, t in s.items() if k != "step"]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert all(t.dtype == torch.float32 for t in ckpt["carried_state"])
    # Validation ran in fp32, outside autocast: the same number an fp32 evaluation gives.
    model, vocab, _ = load_model(tmp_path / "last.pt")
    _, val = read_corpus([corpus_file]).split(0.1)
    ids = torch.tensor(vocab.encode(val))
    loss = evaluate_loss(model, ids)
    assert loss == pytest.approx(ckpt["val_loss"], abs=1e-6)
    assert loss < unigram_entropy(ids, len(vocab)) - 0.2  # it learned context in bf16


def test_bf16_resume_is_exact(tmp_path: Path, corpus_file: Path) -> None:
    common = dict(
        cell=bf16_cell(),
        precision="bf16",
        max_steps=30,
        lr_decay_steps=30,
        eval_interval=15,
        dropout=0.2,
        warmup_steps=5,
    )
    train(tiny_train_config(corpus_file, tmp_path / "straight", **common))
    train(tiny_train_config(corpus_file, tmp_path / "resumed", **dict(common, max_steps=15)))
    train(tiny_train_config(corpus_file, tmp_path / "resumed", **common, resume=True))
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    for name, weights in straight["model_state"].items():
        assert torch.equal(weights, resumed["model_state"][name]), name
    assert straight["val_loss"] == resumed["val_loss"]

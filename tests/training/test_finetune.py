"""Fine-tuning (--init-from): a trained model's weights, its vocabulary extended, a fresh optimizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from exports.contract import file_sha256
from tests.utils import CELLS, SHAKESPEARE, tiny_train_config
from training.checkpoint import load_checkpoint
from training.errors import UserError
from training.prior import extend, load_prior
from training.train import train

NEW_CHARS = ["é", "ß", "→"]


@pytest.fixture(scope="module")
def new_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shakespeare the tiny models never read (after their 120,000 characters), with characters they lack."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[120_000:150_000]
    text = text.replace("e ", "é ").replace("ss", "ß").replace(": ", " → ")
    path = tmp_path_factory.mktemp("new-corpus") / "new.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_an_export_gives_back_the_checkpoint_it_was_made_from(checkpoints: dict[str, Path], models_dir: Path) -> None:
    """The ONNX initializers, gates reordered, are the checkpoint's weights, for every cell."""
    for cell in CELLS:
        from_onnx = load_prior(str(models_dir / f"tiny-{cell}"))
        from_ckpt = load_prior(str(checkpoints[cell]))
        assert from_onnx.config == from_ckpt.config and from_onnx.vocab == from_ckpt.vocab
        assert from_onnx.state.keys() == from_ckpt.state.keys()
        for name, weights in from_ckpt.state.items():
            assert torch.allclose(from_onnx.state[name], weights, atol=1e-7), (cell, name)
        assert from_onnx.sha256 == file_sha256(models_dir / f"tiny-{cell}" / "model.onnx")
    with pytest.raises(UserError, match="int8 variant"):
        load_prior(str(models_dir / "tiny-lstm" / "model.int8.onnx"))


def test_new_characters_get_new_ids_and_neutral_rows(checkpoints: dict[str, Path], new_corpus: Path) -> None:
    prior = load_prior(str(checkpoints["lstm"]))
    model, new = extend(prior, new_corpus.read_text(encoding="utf-8"), 0.0, 0.0)
    assert new == sorted(NEW_CHARS)
    old = len(prior.vocab)
    state = model.state_dict()
    assert torch.equal(state["embedding.weight"][:old], prior.state["embedding.weight"])
    for row in range(old, old + len(new)):
        assert torch.allclose(state["embedding.weight"][row], prior.state["embedding.weight"].mean(0))
        assert torch.allclose(state["head.weight"][row], prior.state["head.weight"].mean(0))
        assert state["head.bias"][row] == prior.state["head.bias"].min()


def test_fine_tuning_beats_training_from_scratch_on_equal_steps(
    tmp_path: Path, checkpoints: dict[str, Path], new_corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prior_path = checkpoints["lstm"]
    common = dict(max_steps=20, eval_interval=20, batch_size=16, warmup_steps=2)
    tuned = train(tiny_train_config(new_corpus, tmp_path / "tuned", init_from=str(prior_path), lr=None, **common))
    said = capsys.readouterr().out
    assert f"fine-tuning from {prior_path}" in said and "peak lr 0.0005" in said
    assert "3 new character(s) added to its " in said
    scratch = train(tiny_train_config(new_corpus, tmp_path / "scratch", **common))
    assert tuned.best_val_loss < scratch.best_val_loss - 0.3

    ckpt = load_checkpoint(tmp_path / "tuned" / "last.pt")
    prior = load_checkpoint(prior_path)
    assert ckpt["vocab"] == prior["vocab"] + sorted(NEW_CHARS)  # old ids kept
    assert ckpt["init_from"] == {
        "path": str(prior_path),
        "sha256": file_sha256(prior_path),
        "vocab_size": len(prior["vocab"]),
        "new_chars": sorted(NEW_CHARS),
    }
    assert ckpt["model_config"]["hidden_size"] == prior["model_config"]["hidden_size"]
    rows = [json.loads(line) for line in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["lr"] for r in rows) <= 5e-4


def test_frozen_layers_stay_as_the_prior_has_them(
    tmp_path: Path, checkpoints: dict[str, Path], new_corpus: Path
) -> None:
    prior = load_checkpoint(checkpoints["gru"])
    train(
        tiny_train_config(
            new_corpus, tmp_path, cell="gru", init_from=str(checkpoints["gru"]), freeze_layers=1, max_steps=5
        )
    )
    tuned = load_checkpoint(tmp_path / "last.pt")["model_state"]
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        assert torch.equal(tuned[f"rnn.{name}"], prior["model_state"][f"rnn.{name}"]), name
    assert not torch.equal(tuned["rnn.weight_hh_l1"], prior["model_state"]["rnn.weight_hh_l1"])
    with pytest.raises(UserError, match="freeze_layers must be between 0 and the model's 2 layers"):
        train(tiny_train_config(new_corpus, tmp_path / "x", init_from=str(checkpoints["gru"]), freeze_layers=3))


def test_a_fine_tune_resumes_exactly_and_only_from_its_prior(
    tmp_path: Path, checkpoints: dict[str, Path], models_dir: Path, new_corpus: Path
) -> None:
    prior = str(models_dir / "tiny-lstm")  # an exported model folder
    common = dict(init_from=prior, max_steps=20, lr_decay_steps=20, eval_interval=10, dropout=0.1)
    train(tiny_train_config(new_corpus, tmp_path / "straight", **common))
    train(tiny_train_config(new_corpus, tmp_path / "resumed", **dict(common, max_steps=10)))
    with pytest.raises(UserError, match=r"was fine-tuned from .*; give init_from again"):
        train(tiny_train_config(new_corpus, tmp_path / "resumed", **dict(common, init_from=None), resume=True))
    with pytest.raises(UserError, match=r"was fine-tuned from .* not from"):
        train(
            tiny_train_config(
                new_corpus, tmp_path / "resumed", **dict(common, init_from=str(checkpoints["lstm"])), resume=True
            )
        )
    train(tiny_train_config(new_corpus, tmp_path / "resumed", **common, resume=True))
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")["model_state"]
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")["model_state"]
    for name, weights in straight.items():
        assert torch.equal(weights, resumed[name]), name

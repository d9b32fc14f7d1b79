from __future__ import annotations

import pytest
import torch

from training.errors import UserError
from training.model import CharRNN, ModelConfig


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_shapes_and_explicit_state(cell: str) -> None:
    cfg = ModelConfig(vocab_size=11, cell=cell, num_layers=3, hidden_size=16, embedding_size=8, dropout=0.1)
    model = CharRNN(cfg).eval()
    tokens = torch.randint(0, 11, (4, 9))
    logits, state = model(tokens)
    assert logits.shape == (4, 9, 11)
    assert len(state) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (3, 4, 16) for s in state)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_carrying_state_equals_one_long_call(cell: str) -> None:
    model = CharRNN(ModelConfig(vocab_size=7, cell=cell, hidden_size=12, embedding_size=4)).eval()
    tokens = torch.randint(0, 7, (2, 20))
    with torch.no_grad():
        whole, _ = model(tokens)
        first, state = model(tokens[:, :8])
        second, _ = model(tokens[:, 8:], state)
    assert torch.allclose(torch.cat([first, second], dim=1), whole, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_layers": 0}, "--layers must be at least 1"),
        ({"hidden_size": -3}, "--hidden must be at least 1"),
        ({"cell": "rnn"}, "--cell must be one of lstm, gru"),
        ({"dropout": 1.5}, "--dropout must be in"),
    ],
)
def test_nonsense_hyper_parameters(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match=message):
        ModelConfig(vocab_size=10, **kwargs)  # type: ignore[arg-type]

from __future__ import annotations

import pytest
import torch

from tests.utils import CELLS
from training.errors import InvalidSetting, UserError
from training.model import CharRNN, ModelConfig


@pytest.mark.parametrize("cell", CELLS)
def test_shapes_and_explicit_state(cell: str) -> None:
    cfg = ModelConfig(vocab_size=11, cell=cell, num_layers=3, hidden_size=16, embedding_size=8, dropout=0.1)
    model = CharRNN(cfg).eval()
    tokens = torch.randint(0, 11, (4, 9))
    logits, state = model(tokens)
    assert logits.shape == (4, 9, 11)
    assert len(state) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (3, 4, 16) for s in state)


@pytest.mark.parametrize("cell", CELLS)
def test_carrying_state_equals_one_long_call(cell: str) -> None:
    model = CharRNN(ModelConfig(vocab_size=7, cell=cell, hidden_size=12, embedding_size=4)).eval()
    tokens = torch.randint(0, 7, (2, 20))
    with torch.no_grad():
        whole, _ = model(tokens)
        first, state = model(tokens[:, :8])
        second, _ = model(tokens[:, 8:], state)
    assert torch.allclose(torch.cat([first, second], dim=1), whole, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_cuts_recurrent_units_in_training_only(cell: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=7, cell=cell, hidden_size=12, embedding_size=4, weight_drop=0.5)
    model = CharRNN(cfg)
    plain = CharRNN(ModelConfig(vocab_size=7, cell=cell, hidden_size=12, embedding_size=4))
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 7, (2, 20))
    model.train()
    plain.train()
    dropped, _ = model(tokens)
    assert not torch.allclose(dropped, plain(tokens)[0])
    # Only the recurrence is cut: the first character, read from a zero state, is the same.
    assert torch.allclose(dropped[:, 0], plain(tokens)[0][:, 0], atol=1e-6)
    # The loss reaches the weights through the mask, and dropped units get no gradient.
    dropped.sum().backward()
    weight = model.rnn.weight_hh_l0
    assert isinstance(weight, torch.Tensor) and weight.grad is not None
    assert (weight.grad.abs().sum(0) == 0).sum() > 0
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], plain(tokens)[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_layers": 0}, "num_layers must be at least 1"),
        ({"hidden_size": -3}, "hidden_size must be at least 1"),
        ({"cell": "tanh"}, "cell must be one of lstm, gru, rnn"),
        ({"dropout": 1.5}, "dropout must be in"),
        ({"embedding_dropout": -0.1}, "embedding_dropout must be in"),
        ({"weight_drop": 1.0}, "weight_drop must be in"),
    ],
)
def test_nonsense_hyper_parameters(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match=message):
        ModelConfig(vocab_size=10, **kwargs)  # type: ignore[arg-type]


def test_errors_speak_the_library_s_names() -> None:
    """The library names its own settings; only the CLI speaks of flags."""
    with pytest.raises(InvalidSetting) as caught:
        ModelConfig(vocab_size=10, num_layers=0)
    assert caught.value.settings == ("num_layers",) and "--" not in str(caught.value)


@pytest.mark.parametrize(("cell", "gate"), [("lstm", 1), ("gru", 1)])
def test_forget_bias_sets_the_keeping_gate_only(cell: str, gate: int) -> None:
    model = CharRNN(ModelConfig(vocab_size=7, cell=cell, num_layers=2, hidden_size=6, embedding_size=4))
    model.set_forget_bias(1.0)
    for layer in range(2):
        total = getattr(model.rnn, f"bias_ih_l{layer}") + getattr(model.rnn, f"bias_hh_l{layer}")
        gates = total.detach().view(-1, 6)  # (gates, hidden), PyTorch's gate order
        assert torch.equal(gates[gate], torch.ones(6))
        others = torch.cat([gates[:gate], gates[gate + 1 :]])
        assert others.abs().max() < 1.0  # PyTorch's uniform init, untouched


def test_forget_bias_needs_a_gated_cell() -> None:
    model = CharRNN(ModelConfig(vocab_size=7, cell="rnn", hidden_size=6, embedding_size=4))
    with pytest.raises(InvalidSetting, match="forget_bias needs a gated cell"):
        model.set_forget_bias(1.0)

"""The character model: embedding -> stacked LSTM, GRU or vanilla RNN -> linear head, state in and out.

Training, sampling, evaluation and ONNX export all build the network from this file;
nothing else defines the architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from training.errors import InvalidSetting, check

CELLS = ("lstm", "gru", "rnn")

# The recurrent state: (h, c) for an LSTM, (h,) for a GRU or a vanilla RNN; each (layers, batch, hidden).
State = tuple[Tensor, ...]

RNN_CLASSES: dict[str, Callable[..., nn.Module]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}  # rnn: tanh


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    cell: str = "lstm"
    num_layers: int = 2
    hidden_size: int = 256
    embedding_size: int = 64
    dropout: float = 0.0  # between recurrent layers and before the head
    embedding_dropout: float = 0.0  # on the embedded characters; training only, the graph is unchanged
    # DropConnect on the recurrent matrices (weight_hh), one mask per forward pass, as AWD-LSTM does:
    # it regularises the recurrence itself, which dropout between layers leaves alone. Training only.
    weight_drop: float = 0.0

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise InvalidSetting(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}", ("cell",))
        for name in ("num_layers", "hidden_size", "embedding_size", "vocab_size"):
            value = getattr(self, name)
            check(value >= 1, name, f"must be at least 1, got {value}")
        for name in ("dropout", "embedding_dropout", "weight_drop"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, name, f"must be in [0, 1), got {value}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def state_tensors(self) -> int:
        return 2 if self.cell == "lstm" else 1


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.embedding_drop = nn.Dropout(config.embedding_dropout)
        self.rnn = RNN_CLASSES[config.cell](
            input_size=config.embedding_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            # PyTorch applies dropout between layers only, so a 1-layer model gets none.
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        device = device if device is not None else self.head.weight.device
        return tuple(torch.zeros(shape, device=device) for _ in range(self.config.state_tensors))

    @torch.no_grad()
    def set_forget_bias(self, value: float) -> None:
        """Start the gates that keep the state (LSTM forget gate, GRU update gate) at bias `value`.

        With a bias of 1 the forget gate starts near sigmoid(1) = 0.73 instead of 0.5, so the cell
        remembers, and gradients flow back, over more steps from the first update on (Jozefowicz
        et al. 2015). PyTorch adds two biases (input and hidden); the input one carries the value.
        """
        cell, hidden = self.config.cell, self.config.hidden_size
        if cell == "rnn":
            raise InvalidSetting("forget_bias needs a gated cell (lstm or gru); rnn has no gates", ("forget_bias",))
        # Gate order: LSTM (input, forget, cell, output); GRU (reset, update, new). For a GRU the
        # update gate z keeps the old state: h' = (1 - z) * n + z * h.
        gate = slice(hidden, 2 * hidden)
        for layer in range(self.config.num_layers):
            getattr(self.rnn, f"bias_ih_l{layer}")[gate] = value
            getattr(self.rnn, f"bias_hh_l{layer}")[gate] = 0.0

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab) and the new state."""
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device)
        x = self.embedding_drop(self.embedding(tokens))  # (batch, seq, embedding)
        carried = (state[0], state[1]) if self.config.cell == "lstm" else state[0]
        if self.training and self.config.weight_drop > 0:
            out, new = torch.func.functional_call(self.rnn, self._dropped_recurrent_weights(), (x, carried))
        else:
            out, new = self.rnn(x, carried)
        new_state: State = tuple(new) if self.config.cell == "lstm" else (new,)
        logits = self.head(self.drop(out))  # (batch, seq, vocab)
        return logits, new_state

    def _dropped_recurrent_weights(self) -> dict[str, Tensor]:
        """Each layer's weight_hh with whole columns (the units of the previous state) dropped and the
        rest scaled by 1 / (1 - p): a unit's recurrent input is cut for the whole window."""
        p = self.config.weight_drop
        dropped = {}
        for layer in range(self.config.num_layers):
            name = f"weight_hh_l{layer}"
            weight = getattr(self.rnn, name)
            keep = torch.bernoulli(torch.full((1, weight.shape[1]), 1 - p, device=weight.device))
            dropped[name] = weight * keep / (1 - p)
        return dropped

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

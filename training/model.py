"""The character model: embedding -> stacked LSTM or GRU -> linear head, state in and out.

Training, sampling, evaluation and ONNX export all build the network from this file;
nothing else defines the architecture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from training.errors import UserError

CELLS = ("lstm", "gru")

# The recurrent state: (h, c) for an LSTM, (h,) for a GRU; each (layers, batch, hidden).
State = tuple[Tensor, ...]


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    cell: str = "lstm"
    num_layers: int = 2
    hidden_size: int = 256
    embedding_size: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise UserError(f"--cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        for field, value in (
            ("--layers", self.num_layers),
            ("--hidden", self.hidden_size),
            ("--embedding", self.embedding_size),
            ("vocab_size", self.vocab_size),
        ):
            if value < 1:
                raise UserError(f"{field} must be at least 1, got {value}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")

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
        rnn_cls = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(
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

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab) and the new state."""
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device)
        x = self.embedding(tokens)  # (batch, seq, embedding)
        if self.config.cell == "lstm":
            out, (h, c) = self.rnn(x, (state[0], state[1]))
            new_state: State = (h, c)
        else:
            out, h = self.rnn(x, state[0])
            new_state = (h,)
        logits = self.head(self.drop(out))  # (batch, seq, vocab)
        return logits, new_state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

"""Every unit's value after each character: a charstream graph stepped one character at a time.

onnxruntime + numpy only, so this runs wherever the .onnx file does. Every layer's state after
each character is kept: for an LSTM both h and c, for a GRU or an RNN h.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exports import contract


@dataclass(frozen=True)
class UnitGroup:
    """One layer's h or c: `hidden` units."""

    layer: int
    state: str  # "h" or "c"


@dataclass
class Activations:
    """Every unit's value after each character: values[group] is (T, hidden) float32."""

    info: contract.ModelInfo
    values: dict[UnitGroup, np.ndarray]

    def unit(self, layer: int, state: str, unit: int) -> np.ndarray:
        return self.values[UnitGroup(layer, state)][:, unit]


def open_model(path: Path) -> tuple[Any, contract.ModelInfo, Path]:
    """An onnxruntime session for a model folder (its model.onnx) or an .onnx file, with its metadata."""
    import onnxruntime as ort

    file = contract.model_file(path)  # a ContractError is a ValueError: the command's one line
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own classes for missing or damaged files
        raise ValueError(f"cannot load {file}: {str(exc).splitlines()[0]}") from None
    try:
        info = contract.parse_metadata(session.get_modelmeta().custom_metadata_map)
    except contract.ContractError as exc:
        raise ValueError(f"{file}: {exc}") from None
    return session, info, file


def run_states(session: Any, info: contract.ModelInfo, text: str) -> Activations:
    """Step the graph over `text` one character at a time from a zero state, keeping every state."""
    index = info.vocab_index
    unknown = sorted({ch for ch in text if ch not in index})
    if unknown:
        raise ValueError(f"the text has {len(unknown)} character(s) outside the model's vocabulary: {unknown[:20]}")
    state_names = info.state_names  # h[, c]
    out_names = list(info.state_out_names)
    shape = (info.num_layers, 1, info.hidden_size)  # (layers, batch, hidden)
    state = [np.zeros(shape, np.float32) for _ in state_names]
    n = len(text)
    # (T, layers, hidden) per state kind, filled one character at a time.
    kept = {name: np.empty((n, info.num_layers, info.hidden_size), np.float32) for name in state_names}
    token = np.zeros((1, 1), np.int64)
    for i, ch in enumerate(text):
        token[0, 0] = index[ch]
        feeds = {contract.INPUT_TOKENS: token, **dict(zip(state_names, state, strict=True))}
        state = session.run(out_names, feeds)
        for name, value in zip(state_names, state, strict=True):
            kept[name][i] = value[:, 0, :]
    values = {
        UnitGroup(layer, name): np.ascontiguousarray(kept[name][:, layer, :])
        for layer in range(info.num_layers)
        for name in state_names
    }
    return Activations(info, values)

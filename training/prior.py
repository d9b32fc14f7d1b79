"""Fine-tuning's starting point: a trained model's weights and vocabulary, read from a checkpoint or an export.

`charstream train --init-from MODEL` starts from MODEL's weights: a checkpoint (.pt), an exported
model folder, or its fp32 .onnx file, whose initializers are read back into the torch layout
and checked against onnxruntime. The architecture is the prior's. The vocabulary is the prior's
followed by the characters of the new corpus it lacks, in sorted order, so every old id keeps
its meaning. A new character starts with the mean of the prior's embedding rows as its
embedding, the mean of the prior's output rows as its output weights, and the prior's lowest
output bias, so it starts as the least likely character and takes nothing from the others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from exports import contract
from training.checkpoint import load_checkpoint
from training.corpus import Vocabulary
from training.errors import InvalidSetting, UserError
from training.model import CharRNN, ModelConfig

# Where each of torch's gate blocks sits in ONNX's weights: ONNX orders an LSTM's gates
# (input, output, forget, cell) and a GRU's (update, reset, new); torch (input, forget, cell,
# output) and (reset, update, new).
_GATES_FROM_ONNX = {"lstm": (0, 2, 3, 1), "gru": (1, 0, 2), "rnn": (0,)}
_ONNX_OPS = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}
# Largest difference between the rebuilt torch model's logits and onnxruntime's on the same input.
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Prior:
    """A trained model to start from: its architecture, vocabulary and weights, and which file it was."""

    config: ModelConfig
    vocab: Vocabulary
    state: dict[str, Tensor]
    path: str
    sha256: str

    def record(self, new_chars: list[str]) -> dict[str, Any]:
        """What a checkpoint says about where its training started."""
        return {"path": self.path, "sha256": self.sha256, "vocab_size": len(self.vocab), "new_chars": new_chars}


def load_prior(path_text: str) -> Prior:
    """The model at `path_text`: a checkpoint, an exported model folder, or an fp32 .onnx file."""
    path = Path(path_text)
    if path.is_dir():
        path = path / contract.MODEL_FILE
        if not path.is_file():
            raise InvalidSetting(f"init_from {path_text} is a folder without {contract.MODEL_FILE}", ("init_from",))
    if not path.is_file():
        raise InvalidSetting(f"init_from {path_text} does not exist", ("init_from",))
    if path.suffix == ".onnx":
        config, vocab, state = _from_onnx(path)
    else:
        ckpt = load_checkpoint(path)
        config, vocab, state = (
            ModelConfig.from_dict(ckpt["model_config"]),
            Vocabulary.from_json(ckpt["vocab"]),
            ckpt["model_state"],
        )
    return Prior(config=config, vocab=vocab, state=state, path=str(path), sha256=contract.file_sha256(path))


def extend(
    prior: Prior, text: str, dropout: float, embedding_dropout: float, weight_drop: float = 0.0
) -> tuple[CharRNN, list[str]]:
    """The prior's model with room for `text`'s new characters (see the module docstring), and those characters."""
    new_chars = sorted(set(text) - set(prior.vocab.chars))
    vocab_size = len(prior.vocab) + len(new_chars)
    config = dataclasses.replace(
        prior.config,
        vocab_size=vocab_size,
        dropout=dropout,
        embedding_dropout=embedding_dropout,
        weight_drop=weight_drop,
    )
    state = dict(prior.state)
    if new_chars:
        n = len(new_chars)
        embedding, head_w, head_b = state["embedding.weight"], state["head.weight"], state["head.bias"]
        state["embedding.weight"] = torch.cat([embedding, embedding.mean(0, keepdim=True).expand(n, -1)])
        state["head.weight"] = torch.cat([head_w, head_w.mean(0, keepdim=True).expand(n, -1)])
        state["head.bias"] = torch.cat([head_b, head_b.min().expand(n)])
    model = CharRNN(config)
    model.load_state_dict(state)
    return model, new_chars


def vocabulary(prior: Prior, new_chars: list[str]) -> Vocabulary:
    return Vocabulary(prior.vocab.chars + tuple(new_chars))


def freeze_layers(model: CharRNN, k: int) -> None:
    """Keep the lowest `k` recurrent layers as they are: their weights get no gradient and no update."""
    if not 0 <= k <= model.config.num_layers:
        raise InvalidSetting(
            f"freeze_layers must be between 0 and the model's {model.config.num_layers} layers, got {k}",
            ("freeze_layers",),
        )
    for name, param in model.rnn.named_parameters():
        layer = int(name.rsplit("_l", 1)[1])  # weight_ih_l0, bias_hh_l1, ...
        param.requires_grad_(layer >= k)


def _from_onnx(path: Path) -> tuple[ModelConfig, Vocabulary, dict[str, Tensor]]:
    """An exported fp32 graph's weights in CharRNN's layout, checked against onnxruntime."""
    import onnx
    from onnx import numpy_helper

    try:
        graph_model = onnx.load(str(path))
        info = contract.parse_metadata({p.key: p.value for p in graph_model.metadata_props})
    except Exception as exc:  # a damaged file or a foreign graph
        raise UserError(f"init_from {path} is not a charstream model ({str(exc).splitlines()[0][:120]})") from None
    if info.variant != "fp32":
        raise UserError(
            f"init_from {path} is the {info.variant} variant; fine-tuning reads the fp32 {contract.MODEL_FILE}"
        )
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph_model.graph.initializer}
    state: dict[str, Tensor] = {}
    layer = 0
    for node in graph_model.graph.node:
        weights = [inits[name] for name in node.input if name in inits]
        if node.op_type == "Gather" and weights:
            state["embedding.weight"] = weights[0]
        elif node.op_type in _ONNX_OPS:
            w, r, b = (inits[name] for name in node.input[1:4])
            hidden = r.shape[-1]
            order = _GATES_FROM_ONNX[_ONNX_OPS[node.op_type]]

            def torch_gates(t: Tensor, order: tuple[int, ...] = order, hidden: int = hidden) -> Tensor:
                return torch.cat([t[g * hidden : (g + 1) * hidden] for g in order])

            gates = len(order) * hidden
            state[f"rnn.weight_ih_l{layer}"] = torch_gates(w[0])
            state[f"rnn.weight_hh_l{layer}"] = torch_gates(r[0])
            state[f"rnn.bias_ih_l{layer}"] = torch_gates(b[0, :gates])
            state[f"rnn.bias_hh_l{layer}"] = torch_gates(b[0, gates:])
            layer += 1
        elif node.op_type == "MatMul" and weights:
            state["head.weight"] = weights[0].T.contiguous()
        elif node.op_type == "Add" and weights and weights[0].dim() == 1:
            state["head.bias"] = weights[0]
    embedding = state.get("embedding.weight")
    if embedding is None or layer != info.num_layers or "head.weight" not in state or "head.bias" not in state:
        raise UserError(f"init_from {path}: its graph does not have the shape charstream exports")
    config = ModelConfig(
        vocab_size=info.vocab_size,
        cell=info.cell,
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        embedding_size=embedding.shape[1],
    )
    model = CharRNN(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"init_from {path}: its weights do not fit its metadata ({str(exc)[:160]})") from None
    _check_parity(model, path)
    return config, Vocabulary(info.vocab), state


def _check_parity(model: CharRNN, path: Path) -> None:
    """The rebuilt model must compute what the graph computes: one window through both, compared."""
    import onnxruntime as ort

    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    state = model.init_state(2)
    with torch.no_grad():
        expected = model.eval()(tokens, state)[0].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray[Any, Any]] = {contract.INPUT_TOKENS: tokens.numpy()}
    for name, tensor in zip(contract.state_names(model.config.cell), state, strict=True):
        feeds[name] = tensor.numpy()
    got = session.run([contract.OUTPUT_LOGITS], feeds)[0]
    worst = float(np.abs(got - expected).max())
    if worst > PARITY_TOLERANCE:
        raise UserError(f"init_from {path}: the weights read back differ from the graph's (by {worst:.3g})")

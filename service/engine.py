"""One onnxruntime session for one exported model: tokens and state in, logits and state out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from exports import contract


class Engine:
    def __init__(self, path: Path, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning workers would burn the core the event loop needs between steps.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The variant is known only after loading, so peek at the metadata with a cheap first load.
        meta = (
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"], sess_options=_metadata_only_options())
            .get_modelmeta()
            .custom_metadata_map
        )
        self.info = contract.parse_metadata(meta)
        options.graph_optimization_level = contract.optimization_level(self.info.variant, ort)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path
        self._input_names = [contract.INPUT_TOKENS, *self.info.state_names]
        found = [i.name for i in self.session.get_inputs()]
        if found != self._input_names:
            raise contract.ContractError(f"graph inputs are {found}, the contract wants {self._input_names}")

    def zero_state(self, batch: int) -> list[np.ndarray]:
        shape = (self.info.num_layers, batch, self.info.hidden_size)
        return [np.zeros(shape, np.float32) for _ in self.info.state_names]

    def run(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """tokens int64 (batch, seq), state [(layers, batch, hidden)] -> logits (batch, seq, vocab), state."""
        feed = dict(zip(self._input_names, (tokens, *state), strict=True))
        outputs = self.session.run(None, feed)
        return outputs[0], list(outputs[1:])


def _metadata_only_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return options

"""One onnxruntime session for one exported model: tokens and state in, logits and state out."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from exports import contract

# Bindings kept per engine, one per batch size seen recently. A batch size changes only when a
# session joins or leaves, so a handful covers the steady state; each one holds a few arrays of
# (layers, batch, hidden).
BINDINGS_KEPT = 8


class StepBinding:
    """Buffers for one-character steps at one batch size, bound once to onnxruntime IOBindings.

    Fill `tokens` and `state_in` in place, call `run()`, read `logits` and `state_out`. Nothing
    is allocated or bound per call: `run_with_iobinding` on pre-bound numpy memory costs a few
    microseconds less than `session.run`, which builds its feeds and output arrays every time.
    The outputs are overwritten by the next `run()`.

    Two state buffer sets are bound crosswise (A in, B out; and B in, A out), so `carry()` makes
    the last step's output state the next step's input without copying it: a batch that stays
    the same from one step to the next never moves its state (at batch 64 of the bundled model
    that is 1 MB gathered and scattered per step otherwise).
    """

    def __init__(self, session: ort.InferenceSession, info: contract.ModelInfo, batch: int) -> None:
        state_shape = (info.num_layers, batch, info.hidden_size)
        self.tokens = np.zeros((batch, 1), np.int64)
        self.logits = np.zeros((batch, 1, info.vocab_size), np.float32)
        self._session = session
        buffers = [[np.zeros(state_shape, np.float32) for _ in info.state_names] for _ in range(2)]
        self._sides = [(buffers[0], buffers[1]), (buffers[1], buffers[0])]  # (state in, state out)
        self._ios = [self._bind(info, state_in, state_out) for state_in, state_out in self._sides]
        self._side = 0

    def _bind(self, info: contract.ModelInfo, state_in: list[np.ndarray], state_out: list[np.ndarray]) -> ort.IOBinding:
        io = self._session.io_binding()
        inputs = [contract.INPUT_TOKENS, *info.state_names]
        outputs = [contract.OUTPUT_LOGITS, *info.state_out_names]
        for name, array in zip(inputs, [self.tokens, *state_in], strict=True):
            io.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for name, array in zip(outputs, [self.logits, *state_out], strict=True):
            io.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        return io

    @property
    def state_in(self) -> list[np.ndarray]:
        return self._sides[self._side][0]

    @property
    def state_out(self) -> list[np.ndarray]:
        return self._sides[self._side][1]

    def carry(self) -> None:
        """Make the last step's output state the next step's input (no copy; `state_out` changes too)."""
        self._side ^= 1

    def run(self) -> None:
        # Releases the GIL while the graph runs, as session.run does.
        self._session.run_with_iobinding(self._ios[self._side])


class Engine:
    def __init__(self, path: Path, threads: int = 1) -> None:
        # The variant is known only after loading, so peek at the metadata with a cheap first load.
        meta = (
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"], sess_options=_metadata_only_options())
            .get_modelmeta()
            .custom_metadata_map
        )
        self.info = contract.parse_metadata(meta)
        options = contract.session_options(ort, self.info.variant, threads)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path
        self._input_names = [contract.INPUT_TOKENS, *self.info.state_names]
        found = [i.name for i in self.session.get_inputs()]
        if found != self._input_names:
            raise contract.ContractError(f"graph inputs are {found}, the contract wants {self._input_names}")
        self._bindings: OrderedDict[int, StepBinding] = OrderedDict()

    def zero_state(self, batch: int) -> list[np.ndarray]:
        shape = (self.info.num_layers, batch, self.info.hidden_size)
        return [np.zeros(shape, np.float32) for _ in self.info.state_names]

    def run(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """tokens int64 (batch, seq), state [(layers, batch, hidden)] -> logits (batch, seq, vocab), state."""
        feed = dict(zip(self._input_names, (tokens, *state), strict=True))
        outputs = self.session.run(None, feed)
        return outputs[0], list(outputs[1:])

    def binding(self, batch: int) -> StepBinding:
        """The pre-bound buffers for one-character steps at this batch size (one caller thread only)."""
        found = self._bindings.get(batch)
        if found is not None:
            self._bindings.move_to_end(batch)
            return found
        made = self._bindings[batch] = StepBinding(self.session, self.info, batch)
        if len(self._bindings) > BINDINGS_KEPT:
            self._bindings.popitem(last=False)
        return made


def _metadata_only_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return options

"""The fp32 stateful graph: torch -> ONNX, its declared shapes, and its parity with torch."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from exports import contract
from training.errors import ExportError
from training.model import CharRNN

OPSET = 17
PARITY_TOLERANCE = 1e-4
ROLLOUT_STEPS = 200
# The example shapes of the trace; parity is then checked at other shapes, proving they are dynamic.
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 5


class _StatefulGraph(nn.Module):
    """CharRNN with the state as separate tensors, the shape an ONNX graph needs."""

    def __init__(self, model: CharRNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, new_state = self.model(tokens, tuple(state))
        return (logits, *new_state)


def io_names(cell: str) -> tuple[list[str], list[str]]:
    return (
        [contract.INPUT_TOKENS, *contract.state_names(cell)],
        [contract.OUTPUT_LOGITS, *contract.state_out_names(cell)],
    )


def expected_dims(cell: str, layers: int, hidden: int, vocab: int) -> dict[str, list[int | str]]:
    state: list[int | str] = [layers, contract.DIM_BATCH, hidden]
    dims: dict[str, list[int | str]] = {
        contract.INPUT_TOKENS: [contract.DIM_BATCH, contract.DIM_SEQ],
        contract.OUTPUT_LOGITS: [contract.DIM_BATCH, contract.DIM_SEQ, vocab],
    }
    for name in contract.state_names(cell) + contract.state_out_names(cell):
        dims[name] = state
    return dims


def export_fp32(model: CharRNN, path: Path, metadata: dict[str, str]) -> None:
    """Write the fp32 graph with the legacy TorchScript exporter, then check its declared shapes.

    The TorchScript exporter (dynamo=False) keeps `batch` and `seq` dynamic and writes the
    recurrent weights as initializers of ONNX's own LSTM, GRU and RNN operators, which dynamic
    int8 quantization needs; the dynamo exporter in this torch version could bake the example
    sizes into the graph without an error.
    """
    import onnx

    cfg = model.config
    inputs, outputs = io_names(cfg.cell)
    tokens = torch.zeros((EXAMPLE_BATCH, EXAMPLE_SEQ), dtype=torch.long)
    state = model.init_state(EXAMPLE_BATCH, "cpu")
    dynamic_axes: dict[str, dict[int, str]] = {
        contract.INPUT_TOKENS: {0: contract.DIM_BATCH, 1: contract.DIM_SEQ},
        contract.OUTPUT_LOGITS: {0: contract.DIM_BATCH, 1: contract.DIM_SEQ},
    }
    for name in inputs[1:] + outputs[1:]:
        dynamic_axes[name] = {1: contract.DIM_BATCH}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about its own deprecation and batch_first RNNs
        torch.onnx.export(
            _StatefulGraph(model).eval(),
            (tokens, *state),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    # Intermediate value_info from the trace can pin shapes; drop it so later passes re-infer.
    del proto.graph.value_info[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "charstream stateful char model"
    check_dims(proto, expected_dims(cfg.cell, cfg.num_layers, cfg.hidden_size, cfg.vocab_size))
    onnx.save(proto, str(path))
    check_file(path)


def check_dims(proto: Any, expected: dict[str, list[int | str]]) -> None:
    """Every graph input and output has exactly the contract's dims: names for dynamic, sizes for fixed."""
    found: dict[str, list[int | str]] = {}
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        found[value.name] = [d.dim_param if d.dim_param else d.dim_value for d in dims]
    if set(found) != set(expected):
        raise ExportError(f"graph has inputs/outputs {sorted(found)}, the contract wants {sorted(expected)}")
    for name, want in expected.items():
        if found[name] != want:
            raise ExportError(f"graph {name!r} has dims {found[name]}, the contract wants {want}")


def check_file(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ExportError(f"{path.name} fails the ONNX checker: {first}") from None


def open_session(path: Path, variant: str = "fp32", threads: int = 1) -> Any:
    """An onnxruntime session with the same options the service uses (exports/contract.py)."""
    import onnxruntime as ort

    return ort.InferenceSession(
        str(path), contract.session_options(ort, variant, threads), providers=["CPUExecutionProvider"]
    )


def ort_feed(tokens: np.ndarray, state: Sequence[np.ndarray], cell: str) -> dict[str, np.ndarray]:
    return dict(zip(io_names(cell)[0], (tokens, *state), strict=True))


@torch.no_grad()
def verify_parity(model: CharRNN, path: Path, tolerance: float = PARITY_TOLERANCE) -> dict[str, float]:
    """Max abs difference (logits and state) between onnxruntime and torch, at several shapes and over a rollout.

    Shapes (1,1), (4,1) and (3, 17) differ from the trace's example (2, 5), so a graph with a
    baked-in size fails here. The rollout feeds the state outputs back for ROLLOUT_STEPS single steps.
    """
    cfg = model.config
    session = open_session(path)
    g = torch.Generator().manual_seed(0)
    errors: dict[str, float] = {}
    for batch, seq in ((1, 1), (4, 1), (3, 17)):
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
        state = tuple(torch.randn(s.shape, generator=g) * 0.5 for s in model.init_state(batch, "cpu"))
        want_logits, want_state = model(tokens, state)
        got = session.run(None, ort_feed(tokens.numpy(), [s.numpy() for s in state], cfg.cell))
        err = max(
            float(np.abs(got[0] - want_logits.numpy()).max()),
            *(float(np.abs(o - w.numpy()).max()) for o, w in zip(got[1:], want_state, strict=True)),
        )
        errors[f"batch{batch}_seq{seq}"] = err

    tokens = torch.randint(0, cfg.vocab_size, (2, ROLLOUT_STEPS), generator=g)
    torch_state = model.init_state(2, "cpu")
    ort_state = [s.numpy() for s in torch_state]
    worst = 0.0
    for t in range(ROLLOUT_STEPS):
        step = tokens[:, t : t + 1]
        want_logits, torch_state = model(step, torch_state)
        got = session.run(None, ort_feed(step.numpy(), ort_state, cfg.cell))
        ort_state = got[1:]
        worst = max(worst, float(np.abs(got[0] - want_logits.numpy()).max()))
    errors[f"rollout{ROLLOUT_STEPS}"] = worst
    max_err = max(errors.values())
    if not max_err <= tolerance:
        where = max(errors, key=lambda k: errors[k])
        raise ExportError(
            f"parity check failed: onnxruntime and torch differ by {max_err:.3g} at {where} (tolerance {tolerance:g})"
        )
    return errors

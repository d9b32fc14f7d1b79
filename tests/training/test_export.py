from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exports import contract
from tests.utils import CELLS
from training.checkpoint import load_model
from training.errors import UserError
from training.export import ExportError, export_many, verify_parity

MODELS = [f"tiny-{cell}" for cell in CELLS]
# The ONNX operator each cell is exported as: onnxruntime's own kernels, nothing hand-made.
OPERATORS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


@pytest.fixture(scope="module")
def vocab_size(corpus_file: Path) -> int:
    return len(set(corpus_file.read_text(encoding="utf-8")))


@pytest.mark.parametrize("name", MODELS)
def test_graph_contract(models_dir: Path, name: str, vocab_size: int) -> None:
    proto = onnx.load(str(models_dir / name / contract.MODEL_FILE))
    onnx.checker.check_model(proto, full_check=True)
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(proto.graph.input) + list(proto.graph.output)
    }
    state = [2, "batch", 48]
    want = {
        "tokens": ["batch", "seq"],
        "h": state,
        "logits": ["batch", "seq", vocab_size],
        "h_out": state,
    }
    if name == "tiny-lstm":
        want |= {"c": state, "c_out": state}
    assert dims == want  # a GRU or RNN graph has no c / c_out
    meta = {p.key: p.value for p in proto.metadata_props}
    info = contract.parse_metadata(meta)
    assert info.cell == name.split("-")[1] and info.num_layers == 2 and info.hidden_size == 48
    assert len(info.vocab) == vocab_size and info.vocab[0] == "\n" and info.corpus == "shakespeare-small.txt"
    assert info.val_loss is not None and info.format_version == contract.FORMAT_VERSION


@pytest.mark.parametrize("name", MODELS)
def test_manifest(models_dir: Path, name: str) -> None:
    manifest = json.loads((models_dir / name / contract.MANIFEST_NAME).read_text())
    assert manifest["format_version"] == contract.FORMAT_VERSION and manifest["opset"] == 17
    assert manifest["parity"]["tolerance"] == 1e-4
    assert set(manifest["parity"]["max_abs_error"]) == {
        "batch1_seq1",
        "batch4_seq1",
        "batch3_seq17",
        "rollout200",
    }
    assert max(manifest["parity"]["max_abs_error"].values()) <= 1e-4
    fp32, int8 = manifest["variants"]["fp32"], manifest["variants"]["int8"]
    for variant in (fp32, int8):
        path = models_dir / name / variant["file"]
        assert variant["bytes"] == path.stat().st_size
        import hashlib

        assert variant["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert variant["step_latency_us_batch1"] > 0
    assert fp32["top1_agreement"] == 1.0 and fp32["val_loss_change"] == 0.0
    assert 0.9 < int8["top1_agreement"] <= 1.0
    assert abs(int8["val_loss_change"]) < 0.05
    assert int8["bytes"] * 2.5 < fp32["bytes"]  # int8 storage is real for every cell
    assert manifest["training"]["val_loss"] == pytest.approx(fp32["val_loss"], abs=1e-3)


@pytest.mark.parametrize("cell", CELLS)
def test_each_cell_is_onnx_s_own_operator(models_dir: Path, cell: str) -> None:
    proto = onnx.load(str(models_dir / f"tiny-{cell}" / contract.MODEL_FILE))
    ops = [n.op_type for n in proto.graph.node if n.op_type in OPERATORS.values()]
    assert ops == [OPERATORS[cell]] * 2  # one per layer
    if cell == "rnn":
        node = next(n for n in proto.graph.node if n.op_type == "RNN")
        activations = next(a for a in node.attribute if a.name == "activations")
        assert [s.decode() for s in activations.strings] == ["Tanh"]


def test_int8_lstm_uses_the_quantized_kernel(models_dir: Path) -> None:
    lstm = onnx.load(str(models_dir / "tiny-lstm" / "model.int8.onnx"))
    assert "DynamicQuantizeLSTM" in {n.op_type for n in lstm.graph.node}


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_int8_gru_and_rnn_store_int8_recurrent_weights(models_dir: Path, cell: str) -> None:
    """onnxruntime has no quantized GRU or RNN kernel: their W and R are stored int8 behind DequantizeLinear."""
    proto = onnx.load(str(models_dir / f"tiny-{cell}" / "model.int8.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    nodes = [n for n in proto.graph.node if n.op_type == OPERATORS[cell]]
    assert len(nodes) == 2
    for node in nodes:
        for weight in node.input[1:3]:
            assert weight not in inits and producers[weight].op_type == "DequantizeLinear"
            assert inits[producers[weight].input[0]].data_type == onnx.TensorProto.INT8
    # The head is a quantized MatMul for every cell.
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in proto.graph.node)


@pytest.mark.parametrize("cell", CELLS)
def test_parity_holds_over_a_long_rollout(checkpoints: dict[str, Path], models_dir: Path, cell: str) -> None:
    model, _, _ = load_model(checkpoints[cell])
    errors = verify_parity(model, models_dir / f"tiny-{cell}" / contract.MODEL_FILE)
    assert max(errors.values()) <= 1e-4


def test_parity_failure_is_loud_and_leaves_nothing(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="parity check failed"):
        export_many([str(checkpoints["lstm"])], str(tmp_path), "fp32", tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []  # the temp folder was removed


def test_parity_check_catches_a_wrong_graph(checkpoints: dict[str, Path], models_dir: Path) -> None:
    model, _, _ = load_model(checkpoints["lstm"])
    with torch.no_grad():
        model.head.bias += 0.01  # the graph on disk no longer matches this model
    with pytest.raises(ExportError, match="parity check failed"):
        verify_parity(model, models_dir / "tiny-lstm" / contract.MODEL_FILE)


def test_ort_files_and_reexport_replaces_the_folder(
    checkpoints: dict[str, Path], tmp_path: Path, vocab_size: int
) -> None:
    export_many([str(checkpoints["gru"])], str(tmp_path), "fp32", names=["m"])
    (tmp_path / "m" / "stale.txt").write_text("from the previous export")
    export_many([str(checkpoints["gru"])], str(tmp_path), "fp32,fp16", ort=True, names=["m"])
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == [
        "manifest.json",
        "model.fp16.onnx",
        "model.fp16.ort",
        "model.onnx",
        "model.ort",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    session = ort.InferenceSession(str(tmp_path / "m" / "model.ort"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"tokens": np.zeros((2, 3), np.int64), "h": np.zeros((2, 2, 48), np.float32)})
    assert out[0].shape == (2, 3, vocab_size)


def test_default_name_and_bad_requests(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    written = export_many([str(checkpoints["gru"])], str(tmp_path), "fp32")
    assert written[0].name == checkpoints["gru"].parent.name
    with pytest.raises(UserError, match="unknown variant 'bf16'"):
        export_many([str(checkpoints["gru"])], str(tmp_path), "fp32,bf16")
    with pytest.raises(UserError, match="2 --name given for 1 checkpoints"):
        export_many([str(checkpoints["gru"])], str(tmp_path), "fp32", names=["a", "b"])

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exports import contract
from training.checkpoint import load_model
from training.errors import UserError
from training.export import ExportError, export_many, verify_parity


@pytest.fixture(scope="module")
def vocab_size(corpus_file: Path) -> int:
    return len(set(corpus_file.read_text(encoding="utf-8")))


@pytest.mark.parametrize("name", ["tiny-lstm", "tiny-gru"])
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
    assert dims == want  # a GRU graph has no c / c_out
    meta = {p.key: p.value for p in proto.metadata_props}
    info = contract.parse_metadata(meta)
    assert info.cell == name.split("-")[1] and info.num_layers == 2 and info.hidden_size == 48
    assert len(info.vocab) == vocab_size and info.vocab[0] == "\n" and info.corpus == "shakespeare-small.txt"
    assert info.val_loss is not None and info.format_version == contract.FORMAT_VERSION


@pytest.mark.parametrize("name", ["tiny-lstm", "tiny-gru"])
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
    assert int8["bytes"] * 2.5 < fp32["bytes"]  # int8 storage is real for LSTM and GRU alike
    assert manifest["training"]["val_loss"] == pytest.approx(fp32["val_loss"], abs=1e-3)


def test_int8_lstm_uses_the_quantized_kernel_and_gru_int8_weights(models_dir: Path) -> None:
    lstm = onnx.load(str(models_dir / "tiny-lstm" / "model.int8.onnx"))
    assert "DynamicQuantizeLSTM" in {n.op_type for n in lstm.graph.node}
    gru = onnx.load(str(models_dir / "tiny-gru" / "model.int8.onnx"))
    inits = {t.name: t for t in gru.graph.initializer}
    gru_node = next(n for n in gru.graph.node if n.op_type == "GRU")
    producers = {o: n for n in gru.graph.node for o in n.output}
    for weight in gru_node.input[1:3]:
        assert weight not in inits and producers[weight].op_type == "DequantizeLinear"
        assert inits[producers[weight].input[0]].data_type == onnx.TensorProto.INT8


@pytest.mark.parametrize("cell", ["lstm", "gru"])
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

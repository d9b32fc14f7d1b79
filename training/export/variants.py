"""Format variants of an fp32 graph: int8, fp16 and onnxruntime's .ort format."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from exports import contract
from training.errors import ExportError
from training.export.graph import check_file

# Recurrent operators onnxruntime has no quantized kernel for: their weights are stored int8.
INT8_STORED_OPS = ("GRU", "RNN")


def _set_variant_metadata(proto: Any, variant: str) -> None:
    for entry in proto.metadata_props:
        if entry.key == contract.META_VARIANT:
            entry.value = variant


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8: MatMul/Gather/LSTM compute in int8; GRU and RNN weights are stored int8.

    onnxruntime has a quantized LSTM kernel (DynamicQuantizeLSTM) but none for GRU or RNN. For
    those we store W and R as int8 with a per-row scale behind DequantizeLinear: the recurrent
    weights shrink ~4x as for an LSTM, the cell itself still computes in fp32 (the head's MatMul
    is int8 for every cell).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    # The quantizer logs a pre-processing hint on the root logger: it is for vision models.
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "q.onnx"
            quantize_dynamic(str(src), str(staged), weight_type=QuantType.QInt8, per_channel=False)
            proto = onnx.load(str(staged))
    finally:
        root.setLevel(level)
    _store_recurrent_weights_int8(proto)
    _set_variant_metadata(proto, "int8")
    onnx.save(proto, str(dst))
    check_file(dst)


def _store_recurrent_weights_int8(proto: Any) -> None:
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes = []
    for node in graph.node:
        if node.op_type not in INT8_STORED_OPS:
            continue
        for name in node.input[1:3]:  # W and R: [directions, gates*hidden, in]
            if name not in inits:
                continue
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            scale = np.abs(w).max(axis=(0, 2)) / 127.0
            scale[scale == 0] = 1.0
            q = np.clip(np.round(w / scale[None, :, None]), -127, 127).astype(np.int8)
            graph.initializer.remove(inits[name])
            graph.initializer.extend(
                [
                    numpy_helper.from_array(q, f"{name}_int8"),
                    numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
                    numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero"),
                ]
            )
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{name}_int8", f"{name}_scale", f"{name}_zero"],
                    [name],
                    axis=1,
                    name=f"{name}_dequantize",
                )
            )
    # DequantizeLinear must come before its consumers: the graph is topologically sorted.
    for i, node in enumerate(new_nodes):
        graph.node.insert(i, node)


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights with fp32 inputs and outputs; the CPU provider inserts casts around ops it lacks."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True)
    _topological_sort(half.graph)
    _set_variant_metadata(half, "fp16")
    onnx.save(half, str(dst))
    check_file(dst)


def _topological_sort(graph: Any) -> None:
    """Reorder nodes so each comes after the producers of its inputs (the fp16 pass appends casts)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("graph has a cycle or an input no node produces")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def convert_ort(src: Path, dst: Path) -> None:
    """The .ort format for onnxruntime mobile and minimal builds (basic optimizations, portable)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])

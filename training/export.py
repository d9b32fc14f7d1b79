"""Export checkpoints to stateful ONNX graphs, verify them against torch, and write edge variants.

Per checkpoint the result is one folder, written to a temp folder and renamed into place,
so a failed export never leaves a partial folder:

    OUT/<name>/model.onnx          fp32 graph (the contract in exports/contract.py)
    OUT/<name>/model.int8.onnx     dynamic int8 quantization
    OUT/<name>/model.fp16.onnx     fp16 weights, fp32 inputs and outputs (optional)
    OUT/<name>/*.ort               onnxruntime format, for mobile and minimal builds (--ort)
    OUT/<name>/manifest.json       facts, hashes, parity, validation loss and latency per variant
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from exports import contract
from training.checkpoint import load_model
from training.corpus import Corpus, Vocabulary, read_corpus
from training.errors import UserError
from training.model import CharRNN

OPSET = 17
VARIANTS = ("fp32", "int8", "fp16")
PARITY_TOLERANCE = 1e-4
ROLLOUT_STEPS = 200
# The example shapes of the trace; parity is then checked at other shapes, proving they are dynamic.
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 5


class ExportError(UserError):
    """An export that must not be shipped: a failed check or a bad request."""


class _StatefulGraph(nn.Module):
    """CharRNN with the state as separate tensors, the shape an ONNX graph needs."""

    def __init__(self, model: CharRNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, new_state = self.model(tokens, tuple(state))
        return (logits, *new_state)


# ---------------------------------------------------------------------------------------------
# fp32 export and its verification


def _io_names(cell: str) -> tuple[list[str], list[str]]:
    if cell == "lstm":
        return (
            [contract.INPUT_TOKENS, contract.INPUT_H, contract.INPUT_C],
            [contract.OUTPUT_LOGITS, contract.OUTPUT_H, contract.OUTPUT_C],
        )
    return [contract.INPUT_TOKENS, contract.INPUT_H], [contract.OUTPUT_LOGITS, contract.OUTPUT_H]


def _expected_dims(cell: str, layers: int, hidden: int, vocab: int) -> dict[str, list[int | str]]:
    state: list[int | str] = [layers, contract.DIM_BATCH, hidden]
    dims: dict[str, list[int | str]] = {
        contract.INPUT_TOKENS: [contract.DIM_BATCH, contract.DIM_SEQ],
        contract.INPUT_H: state,
        contract.OUTPUT_LOGITS: [contract.DIM_BATCH, contract.DIM_SEQ, vocab],
        contract.OUTPUT_H: state,
    }
    if cell == "lstm":
        dims[contract.INPUT_C] = state
        dims[contract.OUTPUT_C] = state
    return dims


def export_fp32(model: CharRNN, path: Path, metadata: dict[str, str]) -> None:
    """Write the fp32 graph with the legacy TorchScript exporter, then check its declared shapes.

    The TorchScript exporter (dynamo=False) keeps `batch` and `seq` dynamic and writes the LSTM
    weights as initializers, which dynamic int8 quantization needs; the dynamo exporter in this
    torch version could bake the example sizes into the graph without an error.
    """
    import onnx

    cfg = model.config
    inputs, outputs = _io_names(cfg.cell)
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
        warnings.simplefilter("ignore")  # the exporter warns about its own deprecation and LSTM batch_first
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
    check_dims(proto, _expected_dims(cfg.cell, cfg.num_layers, cfg.hidden_size, cfg.vocab_size))
    onnx.save(proto, str(path))
    _check(path)


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


def _session(path: Path, threads: int = 1, variant: str = "fp32") -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = contract.optimization_level(variant, ort)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_feed(tokens: np.ndarray, state: Sequence[np.ndarray], cell: str) -> dict[str, np.ndarray]:
    names = _io_names(cell)[0]
    return dict(zip(names, (tokens, *state), strict=True))


@torch.no_grad()
def verify_parity(model: CharRNN, path: Path, tolerance: float = PARITY_TOLERANCE) -> dict[str, float]:
    """Max abs logit difference between onnxruntime and torch, at several shapes and over a rollout.

    Shapes (1,1), (4,1) and (3, 17) differ from the trace's example (2, 5), so a graph with a
    baked-in size fails here. The rollout feeds h_out/c_out back for ROLLOUT_STEPS single steps.
    """
    cfg = model.config
    session = _session(path)
    g = torch.Generator().manual_seed(0)
    errors: dict[str, float] = {}
    for batch, seq in ((1, 1), (4, 1), (3, 17)):
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
        state = tuple(torch.randn(s.shape, generator=g) * 0.5 for s in model.init_state(batch, "cpu"))
        want_logits, want_state = model(tokens, state)
        got = session.run(None, _ort_feed(tokens.numpy(), [s.numpy() for s in state], cfg.cell))
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
        got = session.run(None, _ort_feed(step.numpy(), ort_state, cfg.cell))
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


# ---------------------------------------------------------------------------------------------
# Variants


def _set_variant_metadata(proto: Any, variant: str) -> None:
    for entry in proto.metadata_props:
        if entry.key == contract.META_VARIANT:
            entry.value = variant


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8: MatMul/Gather/LSTM weights become int8; GRU weights are stored int8 (see below).

    onnxruntime has a quantized LSTM kernel (DynamicQuantizeLSTM) but none for GRU. For a GRU we
    store W and R as int8 with a per-row scale behind DequantizeLinear: the file shrinks ~4x as
    for an LSTM, the GRU itself still computes in fp32.
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
    _quantize_gru_weights(proto)
    _set_variant_metadata(proto, "int8")
    onnx.save(proto, str(dst))
    _check(dst)


def _quantize_gru_weights(proto: Any) -> None:
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes = []
    for node in graph.node:
        if node.op_type != "GRU":
            continue
        for name in node.input[1:3]:  # W and R: [directions, 3*hidden, in]
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
    _check(dst)


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


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ExportError(f"{path.name} fails the ONNX checker: {first}") from None


def convert_ort(src: Path, dst: Path) -> None:
    """The .ort format for onnxruntime mobile and minimal builds (basic optimizations, portable)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------
# Measurements per variant


def ort_lanes_eval(
    session: Any,
    cell: str,
    layers: int,
    hidden: int,
    ids: np.ndarray,
    lanes: int = 8,
    window: int = 256,
) -> tuple[float, np.ndarray]:
    """Loss (nats/char) over `ids` read as carried-state lanes, and the argmax at every position."""
    n = ids.size - 1
    lanes = max(1, min(lanes, n // 2 or 1))
    lane_len = n // lanes
    x = ids[: lanes * lane_len].reshape(lanes, lane_len)
    y = ids[1 : lanes * lane_len + 1].reshape(lanes, lane_len)
    state = [np.zeros((layers, lanes, hidden), np.float32) for _ in range(2 if cell == "lstm" else 1)]
    total = 0.0
    argmax = np.empty_like(y)
    for start in range(0, lane_len, window):
        xs, ys = x[:, start : start + window], y[:, start : start + window]
        out = session.run(None, _ort_feed(np.ascontiguousarray(xs), state, cell))
        logits, state = out[0].astype(np.float64), out[1:]
        m = logits.max(axis=-1, keepdims=True)
        logz = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]
        picked = np.take_along_axis(logits, ys[..., None], axis=-1)[..., 0]
        total += float((logz - picked).sum())
        argmax[:, start : start + window] = logits.argmax(axis=-1)
    return total / y.size, argmax


def step_latency_us(session: Any, cell: str, layers: int, hidden: int, runs: int = 300) -> float:
    """Median wall time of one single-character step at batch 1, in microseconds."""
    tokens = np.zeros((1, 1), np.int64)
    state = [np.zeros((layers, 1, hidden), np.float32) for _ in range(2 if cell == "lstm" else 1)]
    feed = _ort_feed(tokens, state, cell)
    for _ in range(20):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# One checkpoint -> one folder


@dataclass
class ExportRequest:
    checkpoint: Path
    name: str
    variants: tuple[str, ...]
    ort: bool
    eval_corpus: Corpus | None  # variants are measured on its validation split
    tolerance: float = PARITY_TOLERANCE


def parse_variants(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ExportError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if not names:
        raise ExportError("--variants is empty")
    # fp32 is always written: it is the reference every other variant is measured against.
    return ("fp32", *(v for v in names if v != "fp32"))


def default_name(checkpoint: Path) -> str:
    """runs/shakespeare-lstm/best.pt -> shakespeare-lstm; other.pt -> other."""
    if checkpoint.stem in ("best", "last") and checkpoint.parent.name:
        return checkpoint.parent.resolve().name
    return checkpoint.stem


def export_one(request: ExportRequest, out: Path) -> Path:
    model, vocab, ckpt = load_model(request.checkpoint)
    cfg = model.config
    corpus = ckpt.get("corpus", {})
    metadata = contract.metadata_for(
        vocab.to_json(),
        cfg.cell,
        cfg.num_layers,
        cfg.hidden_size,
        cfg.embedding_size,
        corpus.get("name", ""),
        ckpt.get("val_loss"),
    )
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{request.name}.", suffix=".tmp", dir=out))
    try:
        manifest = _build(request, model, vocab, ckpt, metadata, staging)
        (staging / contract.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; a server running as another user must read it
        final = out / request.name
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{request.name}.", suffix=".old", dir=out))
            final.rename(old / "previous")
            staging.rename(final)
            shutil.rmtree(old)
        else:
            staging.rename(final)
        return final
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _build(
    request: ExportRequest,
    model: CharRNN,
    vocab: Vocabulary,
    ckpt: dict[str, Any],
    metadata: dict[str, str],
    folder: Path,
) -> dict[str, Any]:
    cfg = model.config
    fp32 = folder / contract.MODEL_FILE
    export_fp32(model, fp32, metadata)
    parity = verify_parity(model, fp32, request.tolerance)

    files = {"fp32": fp32}
    if "int8" in request.variants:
        files["int8"] = folder / "model.int8.onnx"
        quantize_int8(fp32, files["int8"])
    if "fp16" in request.variants:
        files["fp16"] = folder / "model.fp16.onnx"
        convert_fp16(fp32, files["fp16"])

    eval_ids = None
    if request.eval_corpus is not None:
        # The same split the checkpoint was validated on.
        _, held_out = request.eval_corpus.split(ckpt.get("corpus", {}).get("val_fraction") or 0.1)
        eval_ids = np.asarray(vocab.encode(held_out), dtype=np.int64)
    reference_argmax: np.ndarray | None = None
    reference_loss: float | None = None
    variants: dict[str, Any] = {}
    for variant, path in files.items():
        session = _session(path, variant=variant)
        entry: dict[str, Any] = {
            "file": path.name,
            "sha256": _sha256(path),
            "bytes": path.stat().st_size,
            "step_latency_us_batch1": round(step_latency_us(session, cfg.cell, cfg.num_layers, cfg.hidden_size), 1),
        }
        if eval_ids is not None:
            loss, argmax = ort_lanes_eval(session, cfg.cell, cfg.num_layers, cfg.hidden_size, eval_ids)
            if reference_argmax is None:
                reference_argmax, reference_loss = argmax, loss
            entry["val_loss"] = round(loss, 5)
            entry["val_loss_change"] = round(loss - (reference_loss or loss), 5)
            entry["top1_agreement"] = round(float((argmax == reference_argmax).mean()), 5)
        if variant == "fp32":
            entry["parity_max_abs_error"] = max(parity.values())
        if request.ort:
            ort_path = path.with_suffix(".ort")
            convert_ort(path, ort_path)
            entry["ort"] = {
                "file": ort_path.name,
                "sha256": _sha256(ort_path),
                "bytes": ort_path.stat().st_size,
            }
        variants[variant] = entry

    corpus = ckpt.get("corpus", {})
    return {
        "format_version": contract.FORMAT_VERSION,
        "name": request.name,
        "cell": cfg.cell,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "embedding_size": cfg.embedding_size,
        "vocab_size": cfg.vocab_size,
        "parameters": model.num_parameters(),
        "opset": OPSET,
        "training": {
            "corpus": corpus.get("name"),
            "corpus_chars": corpus.get("chars"),
            "corpus_sha256": corpus.get("sha256"),
            "val_fraction": corpus.get("val_fraction"),
            "val_loss": ckpt.get("val_loss"),
            "step": ckpt.get("step"),
            "config": ckpt.get("train_config"),
        },
        "evaluation": {
            "chars": None if eval_ids is None else int(eval_ids.size),
            "what": "validation split of --data" if eval_ids is not None else "not evaluated (no --data given)",
        },
        "parity": {"tolerance": request.tolerance, "max_abs_error": parity},
        "variants": variants,
        "torch_version": torch.__version__,
    }


def export_many(
    checkpoints: Sequence[str],
    out: str,
    variants: str = "fp32,int8",
    ort: bool = False,
    names: Sequence[str] | None = None,
    data: Sequence[str] | None = None,
    tolerance: float = PARITY_TOLERANCE,
) -> list[Path]:
    """Export each checkpoint to OUT/<name>/; every folder is complete or absent."""
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} exists and is not a folder")
    chosen = parse_variants(variants)
    if names is not None and len(names) != len(checkpoints):
        raise ExportError(f"{len(names)} --name given for {len(checkpoints)} checkpoints")
    eval_corpus = read_corpus(data) if data else None
    requests = []
    for i, ckpt in enumerate(checkpoints):
        path = Path(ckpt)
        name = names[i] if names else default_name(path)
        if not name or "/" in name or name.startswith("."):
            raise ExportError(f"model name {name!r} must be a plain folder name")
        requests.append(ExportRequest(path, name, chosen, ort, eval_corpus, tolerance))
    written = []
    for request in requests:
        folder = export_one(request, out_dir)
        manifest = json.loads((folder / contract.MANIFEST_NAME).read_text())
        sizes = ", ".join(f"{k} {v['bytes'] / 1e6:.2f} MB" for k, v in manifest["variants"].items())
        print(f"exported {request.checkpoint} -> {folder} ({sizes}; parity {manifest['parity']['max_abs_error']})")
        written.append(folder)
    return written

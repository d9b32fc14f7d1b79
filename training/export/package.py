"""One checkpoint -> one model folder: the graph, its variants, their measurements and the manifest.

Per checkpoint the result is one folder, written to a temp folder and renamed into place,
so a failed export never leaves a partial folder:

    OUT/<name>/model.onnx          fp32 graph (the contract in exports/contract.py)
    OUT/<name>/model.int8.onnx     dynamic int8 quantization
    OUT/<name>/model.fp16.onnx     fp16 weights, fp32 inputs and outputs (optional)
    OUT/<name>/*.ort               onnxruntime format, for mobile and minimal builds (--ort)
    OUT/<name>/manifest.json       facts, hashes, parity, validation loss and latency per variant
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exports import contract
from training.checkpoint import load_model
from training.corpus import Corpus, Vocabulary, read_corpus
from training.errors import ExportError
from training.export.graph import OPSET, PARITY_TOLERANCE, export_fp32, open_session, verify_parity
from training.export.measure import ort_lanes_eval, step_latency_us
from training.export.variants import convert_fp16, convert_ort, quantize_int8
from training.model import CharRNN, ModelConfig


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
    unknown = [v for v in names if v not in contract.VARIANTS]
    if unknown:
        raise ExportError(f"unknown variant {unknown[0]!r}; choose from {', '.join(contract.VARIANTS)}")
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
    """Write the graph and its variants into `folder`, measure each, and return the manifest."""
    fp32 = folder / contract.VARIANT_FILES["fp32"]
    export_fp32(model, fp32, metadata)
    parity = verify_parity(model, fp32, request.tolerance)
    files = _write_variants(fp32, request.variants, folder)
    eval_ids = _held_out_ids(request.eval_corpus, vocab, ckpt)
    variants = _measure_variants(files, model.config, eval_ids, parity, request.ort)
    return _manifest(request, model, ckpt, eval_ids, parity, variants)


def _write_variants(fp32: Path, variants: tuple[str, ...], folder: Path) -> dict[str, Path]:
    """The fp32 file and the variants made from it, fp32 first: it is the reference of the others."""
    files = {"fp32": fp32}
    if "int8" in variants:
        files["int8"] = folder / contract.VARIANT_FILES["int8"]
        quantize_int8(fp32, files["int8"])
    if "fp16" in variants:
        files["fp16"] = folder / contract.VARIANT_FILES["fp16"]
        convert_fp16(fp32, files["fp16"])
    return files


def _held_out_ids(eval_corpus: Corpus | None, vocab: Vocabulary, ckpt: dict[str, Any]) -> np.ndarray | None:
    """The ids of the split the checkpoint was validated on, when a corpus is given."""
    if eval_corpus is None:
        return None
    _, held_out = eval_corpus.split(ckpt.get("corpus", {}).get("val_fraction") or 0.1)
    return np.asarray(vocab.encode(held_out), dtype=np.int64)


def _measure_variants(
    files: dict[str, Path],
    cfg: ModelConfig,
    eval_ids: np.ndarray | None,
    parity: dict[str, float],
    ort: bool,
) -> dict[str, Any]:
    """One manifest entry per variant: its file, latency and, on `eval_ids`, its loss and agreement with fp32."""
    reference: tuple[float, np.ndarray] | None = None  # fp32's loss and argmax
    variants: dict[str, Any] = {}
    for variant, path in files.items():
        session = open_session(path, variant=variant)
        entry: dict[str, Any] = {
            **_file_entry(path),
            "step_latency_us_batch1": round(step_latency_us(session, cfg.cell, cfg.num_layers, cfg.hidden_size), 1),
        }
        if eval_ids is not None:
            loss, argmax = ort_lanes_eval(session, cfg.cell, cfg.num_layers, cfg.hidden_size, eval_ids)
            if reference is None:
                reference = (loss, argmax)
            entry["val_loss"] = round(loss, 5)
            entry["val_loss_change"] = round(loss - reference[0], 5)
            entry["top1_agreement"] = round(float((argmax == reference[1]).mean()), 5)
        if variant == "fp32":
            entry["parity_max_abs_error"] = max(parity.values())
        if ort:
            ort_path = path.with_suffix(".ort")
            convert_ort(path, ort_path)
            entry["ort"] = _file_entry(ort_path)
        variants[variant] = entry
    return variants


def _file_entry(path: Path) -> dict[str, Any]:
    return {"file": path.name, "sha256": contract.file_sha256(path), "bytes": path.stat().st_size}


def _manifest(
    request: ExportRequest,
    model: CharRNN,
    ckpt: dict[str, Any],
    eval_ids: np.ndarray | None,
    parity: dict[str, float],
    variants: dict[str, Any],
) -> dict[str, Any]:
    cfg = model.config
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

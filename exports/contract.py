"""Names, shapes and metadata keys of a charstream ONNX graph: the contract between export and serving.

Graph inputs:  tokens int64 [batch, seq]; h float32 [layers, batch, hidden]; c (LSTM only) same as h.
               A GRU and a vanilla RNN carry h only.
Graph outputs: logits float32 [batch, seq, vocab]; h_out, c_out (LSTM only) same shapes as h, c.
`batch` and `seq` are dynamic, so one graph serves a step of many sessions (seq = 1) and
priming a whole prompt (seq = T).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_FILE = "model.onnx"
CELLS_FILE = "cells.json"  # the cell finder's report, next to the model: the service offers its units

INPUT_TOKENS = "tokens"
INPUT_H = "h"
INPUT_C = "c"
OUTPUT_LOGITS = "logits"
OUTPUT_H = "h_out"
OUTPUT_C = "c_out"
DIM_BATCH = "batch"
DIM_SEQ = "seq"

# metadata_props keys: one .onnx file carries everything an edge device needs.
META_FORMAT_VERSION = "format_version"
META_VOCAB = "vocab"
META_CELL = "cell"
META_NUM_LAYERS = "num_layers"
META_HIDDEN_SIZE = "hidden_size"
META_EMBEDDING_SIZE = "embedding_size"
META_CORPUS = "corpus"
META_VAL_LOSS = "val_loss"
META_VARIANT = "variant"

CELLS = ("lstm", "gru", "rnn")

# The files of one model folder, one per variant: export writes them, the service picks one.
VARIANT_FILES = {"fp32": MODEL_FILE, "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
VARIANTS = tuple(VARIANT_FILES)


def state_names(cell: str) -> tuple[str, ...]:
    """The state inputs of a cell's graph, in order: an LSTM carries (h, c), a GRU or RNN only h."""
    return (INPUT_H, INPUT_C) if cell == "lstm" else (INPUT_H,)


def state_out_names(cell: str) -> tuple[str, ...]:
    return (OUTPUT_H, OUTPUT_C) if cell == "lstm" else (OUTPUT_H,)


def session_options(ort: Any, variant: str, threads: int = 1) -> Any:
    """The onnxruntime session options every charstream graph is run with, serving and measuring alike.

    One thread per session by default (the service steps many sessions in one batched call rather
    than splitting one call across cores), no spinning workers (they would burn the core the
    event loop needs between steps), and the variant's optimization level.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = optimization_level(variant, ort)
    return options


def optimization_level(variant: str, ort: Any) -> Any:
    """The onnxruntime graph optimization level a variant is opened with.

    fp16 graphs crash onnxruntime 1.31's CPU provider at ORT_ENABLE_ALL (seen with dynamic seq),
    so they stop at EXTENDED; every other variant gets ALL.
    """
    level = ort.GraphOptimizationLevel
    return level.ORT_ENABLE_EXTENDED if variant == "fp16" else level.ORT_ENABLE_ALL


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks: a model file names its exact bytes by it."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ContractError(ValueError):
    """A file that does not follow the charstream graph contract."""


def model_file(model: Path, variant: str = "fp32") -> Path:
    """The .onnx file a model argument names: the file itself, or the variant's file in a model folder."""
    if model.is_dir():
        if variant not in VARIANT_FILES:
            raise ContractError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        path = model / VARIANT_FILES[variant]
        if not path.is_file():
            raise ContractError(f"{model} has no {path.name} (variant {variant})")
        return path
    if model.suffix != ".onnx" or not model.is_file():
        raise ContractError(f"{model} is neither an exported model folder nor an .onnx file")
    return model


@dataclass(frozen=True)
class ModelInfo:
    """What a charstream graph says about itself in its metadata."""

    vocab: tuple[str, ...]
    cell: str
    num_layers: int
    hidden_size: int
    format_version: int
    corpus: str
    val_loss: float | None
    variant: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @cached_property
    def vocab_index(self) -> dict[str, int]:
        return {ch: i for i, ch in enumerate(self.vocab)}

    @property
    def state_names(self) -> tuple[str, ...]:
        return state_names(self.cell)

    @property
    def state_out_names(self) -> tuple[str, ...]:
        return state_out_names(self.cell)

    @property
    def state_shape_per_row(self) -> tuple[int, int]:
        """(layers, hidden): one session's slice of each state tensor."""
        return (self.num_layers, self.hidden_size)


def metadata_for(
    vocab: list[str],
    cell: str,
    num_layers: int,
    hidden_size: int,
    embedding_size: int,
    corpus: str,
    val_loss: float | None,
    variant: str = "fp32",
) -> dict[str, str]:
    return {
        META_FORMAT_VERSION: str(FORMAT_VERSION),
        META_VOCAB: json.dumps(vocab, ensure_ascii=False),
        META_CELL: cell,
        META_NUM_LAYERS: str(num_layers),
        META_HIDDEN_SIZE: str(hidden_size),
        META_EMBEDDING_SIZE: str(embedding_size),
        META_CORPUS: corpus,
        META_VAL_LOSS: "" if val_loss is None else f"{val_loss:.6f}",
        META_VARIANT: variant,
    }


def parse_metadata(meta: Mapping[str, str]) -> ModelInfo:
    """Read a graph's metadata_props (e.g. onnxruntime's custom_metadata_map) into a ModelInfo."""
    missing = [
        k for k in (META_FORMAT_VERSION, META_VOCAB, META_CELL, META_NUM_LAYERS, META_HIDDEN_SIZE) if k not in meta
    ]
    if missing:
        raise ContractError(f"not a charstream graph: metadata lacks {', '.join(missing)}")
    try:
        version = int(meta[META_FORMAT_VERSION])
        vocab = json.loads(meta[META_VOCAB])
        num_layers = int(meta[META_NUM_LAYERS])
        hidden_size = int(meta[META_HIDDEN_SIZE])
    except (ValueError, TypeError) as exc:
        raise ContractError(f"charstream metadata is malformed: {exc}") from None
    if version != FORMAT_VERSION:
        raise ContractError(f"graph format version {version}; this charstream reads {FORMAT_VERSION}")
    if not isinstance(vocab, list) or not vocab or not all(isinstance(v, str) and len(v) == 1 for v in vocab):
        raise ContractError("metadata 'vocab' must be a JSON array of one-character strings")
    cell = meta[META_CELL]
    if cell not in CELLS:
        raise ContractError(f"metadata 'cell' must be one of {', '.join(CELLS)}, got {cell!r}")
    val = meta.get(META_VAL_LOSS, "")
    return ModelInfo(
        vocab=tuple(vocab),
        cell=cell,
        num_layers=num_layers,
        hidden_size=hidden_size,
        format_version=version,
        corpus=meta.get(META_CORPUS, ""),
        val_loss=float(val) if val else None,
        variant=meta.get(META_VARIANT, "fp32"),
    )

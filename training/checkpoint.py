"""Self-describing checkpoints: one dict with everything needed to resume, sample or export.

Checkpoints are written atomically (temp file in the same folder, fsync, rename), so a
kill at any moment leaves either the previous checkpoint or the new one, never half a file.
They load with `weights_only=True`: only tensors and plain data, no pickled code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from training.corpus import Vocabulary
from training.errors import UserError
from training.model import CharRNN, ModelConfig

CHECKPOINT_FORMAT = "charstream-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "model_config", "model_state", "vocab")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself is made durable by syncing the folder entry.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stray_temp_files(*paths: Path) -> list[Path]:
    """Delete the temp files a kill in the middle of `save_atomic` left beside these checkpoints."""
    removed = []
    for path in paths:
        for stray in path.parent.glob(f"{_temp_prefix(path)}*.tmp"):
            stray.unlink(missing_ok=True)
            removed.append(stray)
    return removed


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged or foreign file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint ({first_line[:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a charstream checkpoint (unknown format)")
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise UserError(
            f"{path} has checkpoint format version {ckpt.get('format_version')!r}; "
            f"this charstream reads version {CHECKPOINT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[CharRNN, Vocabulary]:
    config = ModelConfig.from_dict(ckpt["model_config"])
    model = CharRNN(config)
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint weights do not fit its model config: {str(exc)[:200]}") from None
    model.eval()
    return model, Vocabulary.from_json(ckpt["vocab"])


def load_model(path: str | Path) -> tuple[CharRNN, Vocabulary, dict[str, Any]]:
    """The model (eval mode, CPU), its vocabulary and the raw checkpoint dict."""
    ckpt = load_checkpoint(path)
    model, vocab = model_from_checkpoint(ckpt)
    return model, vocab, ckpt

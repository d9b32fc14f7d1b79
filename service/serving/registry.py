"""Every model folder under the models folder, loaded at start-up; a broken one is reported, not fatal.

A loaded model can be replaced by a new version of its folder without a restart
(service/serving/swaps.py): `load_folder` loads one folder, `stamp` says whether its file changed
since (an export renames a whole new folder into place, so the file is a new inode).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exports import contract
from service.core.engine import Engine
from service.errors import InvalidInput, ModelUnavailable, NotFound, ServiceConfigError
from service.settings import Settings

log = logging.getLogger("charstream.registry")

VARIANT_FILES = contract.VARIANT_FILES  # one home: the export writes the same names


Stamp = tuple[int, int, int, int]  # the file's device, inode, size and mtime (ns)


def stamp(path: Path) -> Stamp | None:
    """What changes when a file is replaced (None: no such file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ModelLoadError(Exception):
    """A model folder that does not load; the message is the reason, one line."""


@dataclass
class LoadedModel:
    id: str
    folder: Path
    engine: Engine
    sha256: str  # of the model file, hashed when it was loaded: a stored session belongs to exactly this file
    manifest: dict[str, Any] = field(default_factory=dict)
    stamp: Stamp | None = None  # of the model file, when it was loaded

    def describe(self) -> dict[str, Any]:
        """The OpenAI-style model object, with the facts a client needs to use it."""
        info = self.engine.info
        return {
            "id": self.id,
            "object": "model",
            "created": int(self.engine.path.stat().st_mtime),  # when the model file was written
            "owned_by": "charstream",
            "cell": info.cell,
            "num_layers": info.num_layers,
            "hidden_size": info.hidden_size,
            "vocab_size": info.vocab_size,
            "variant": info.variant,
            "corpus": info.corpus,
            "val_loss": info.val_loss,
            "file": self.engine.path.name,
        }


def load_folder(folder: Path, variant: str, threads: int) -> LoadedModel:
    """One model folder's `variant` file and manifest; ModelLoadError saying why not."""
    path = folder / VARIANT_FILES[variant]
    before = stamp(path)
    try:
        engine = Engine(path, threads)
        # Hashed here, where the file is loaded (off the event loop when a swap loads it), not on first use.
        sha256 = contract.file_sha256(path)
        manifest_path = folder / contract.MANIFEST_NAME
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    except Exception as exc:  # any broken file is reported, never fatal
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path.name}: {reason[:300]}") from exc
    return LoadedModel(folder.name, folder, engine, sha256, manifest, before)


class ModelRegistry:
    def __init__(
        self,
        models: dict[str, LoadedModel],
        failures: dict[str, str],
        default: str | None,
        variant: str = "fp32",
        threads: int = 1,
        models_dir: Path | None = None,
    ) -> None:
        self.models = models
        self.failures = failures
        self.default = default
        self.variant, self.threads = variant, threads  # how a new version of a folder is loaded
        self.models_dir = models_dir
        # Model id -> why its new version did not load (the version before it still serves).
        self.swap_failures: dict[str, str] = {}
        # Folders not loaded, by the stamp of their file when they were last tried: tried again once it changes.
        self.tried: dict[str, Stamp | None] = {}
        if models_dir is not None:
            for name in failures:
                self.tried[name] = stamp(models_dir / name / VARIANT_FILES[variant])

    def file_of(self, model: LoadedModel) -> Path:
        return model.folder / VARIANT_FILES[self.variant]

    def new_folders(self) -> list[Path]:
        """Model folders that appeared (or whose file changed since they failed) and are not loaded."""
        if self.models_dir is None or not self.models_dir.is_dir():
            return []
        found = []
        for folder in sorted(self.models_dir.iterdir()):
            if folder.name.startswith((".", "_")) or folder.name in self.models or not folder.is_dir():
                continue
            now = stamp(folder / VARIANT_FILES[self.variant])
            if now is not None and now != self.tried.get(folder.name):
                found.append(folder)
        return found

    def reload(self, model_id: str) -> LoadedModel:
        """The folder of a loaded model, loaded again (a new engine beside the one serving)."""
        return load_folder(self.models[model_id].folder, self.variant, self.threads)

    @classmethod
    def load(
        cls, models_dir: Path, variant: str = "fp32", threads: int = 1, default: str | None = None
    ) -> ModelRegistry:
        models: dict[str, LoadedModel] = {}
        failures: dict[str, str] = {}
        if not models_dir.is_dir():
            failures["*"] = f"models folder {models_dir} does not exist"
            log.error("models folder missing", extra={"models_dir": str(models_dir)})
            return cls(models, failures, None, variant, threads, models_dir)
        filename = VARIANT_FILES[variant]
        for folder in sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            path = folder / filename
            if not path.exists():
                if any(folder.glob("*.onnx")):
                    failures[folder.name] = f"{folder.name} has no {filename}"
                continue  # not a model folder (e.g. __pycache__)
            try:
                models[folder.name] = load_folder(folder, variant, threads)
            except ModelLoadError as exc:
                failures[folder.name] = str(exc)
                log.error("model failed to load", extra={"model": folder.name, "reason": str(exc)})
                continue
            log.info(
                "model loaded",
                extra={"model": folder.name, "file": str(path), "cell": models[folder.name].engine.info.cell},
            )
        if not models and not failures:
            failures["*"] = f"no model folders under {models_dir}"
        if default is not None and default not in models:
            failures.setdefault(default, f"default model {default!r} is not loaded")
            default = None
        if default is None and models:
            default = next(iter(models))
        return cls(models, failures, default, variant, threads, models_dir)

    @property
    def ready(self) -> bool:
        return bool(self.models)

    def get(self, model_id: str | None) -> LoadedModel:
        if model_id is None:
            if self.default is None:
                raise ModelUnavailable("no model is loaded; see /readyz for why")
            return self.models[self.default]
        if model_id in self.models:
            return self.models[model_id]
        if model_id in self.failures:
            raise ModelUnavailable(f"model {model_id!r} failed to load: {self.failures[model_id]}", field="model")
        raise NotFound(f"model {model_id!r} does not exist; GET /v1/models lists them", field="model")

    def encode(self, model: LoadedModel, text: str, field_name: str) -> list[int]:
        """Token ids of `text`, or a 422 naming the characters the model has never seen."""
        index = model.engine.info.vocab_index
        missing = sorted({ch for ch in text if ch not in index})
        if missing:
            shown = ", ".join(repr(ch) for ch in missing[:20])
            raise InvalidInput(
                f"{field_name} has {len(missing)} character(s) outside the vocabulary of model {model.id!r}: {shown}",
                field=field_name,
            )
        return [index[ch] for ch in text]


def load_registry(settings: Settings) -> ModelRegistry:
    """The models folder, loaded; with CHARSTREAM_REQUIRE_MODELS, any failure stops the start."""
    registry = ModelRegistry.load(settings.models_dir, settings.variant, settings.ort_threads, settings.default_model)
    if settings.require_models and (registry.failures or not registry.ready):
        reasons = "; ".join(f"{k}: {v}" for k, v in registry.failures.items())
        raise ServiceConfigError(f"CHARSTREAM_REQUIRE_MODELS is set and models failed: {reasons}")
    return registry

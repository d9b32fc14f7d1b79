"""`--precision auto` by measurement: a few training steps of each candidate precision, timed on the
run's own model, batch and device; the fastest is kept, unless it is within 5% of fp32 (fp32 then:
the same speed without rounding). Flags do not decide, and neither does an old number: the same
CPU flags were measured both faster and slower in bf16 as kernels, library versions and load
changed (the training docs keep the numbers).

The result is cached (`cache_file`: CHARSTREAM_CACHE_DIR, else the user's cache folder), keyed by
the device's name, the torch version, the model's shape and the batch, so a resume or the next
run of the same shape does not measure again. The probe is a copy of the model on forked RNGs:
the run's weights and random streams are untouched. A candidate the device cannot run is skipped,
with the reason.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from training.precision import Precision, cannot_run

CANDIDATES = {"cpu": ("bf16", "fp32"), "cuda": ("bf16", "fp16", "fp32")}
KEEP_FP32_WITHIN = 1.05  # a candidate must be more than 5% faster than fp32 to be kept
BUDGET_S = 12.0  # the whole calibration, every candidate together
TIMED_STEPS = 3


@dataclass
class Calibration:
    chosen: str
    seconds_per_step: dict[str, float]  # each candidate measured
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it cannot run here
    key: str = ""
    cached: bool = False

    def reason(self) -> str:
        measured = ", ".join(f"{name} {s * 1000:.0f} ms/step" for name, s in self.seconds_per_step.items())
        skipped = "".join(f"; {name} skipped ({why})" for name, why in self.skipped.items())
        fp32 = self.seconds_per_step.get("fp32")
        mine = self.seconds_per_step.get(self.chosen)
        ratio = f", {fp32 / mine:.2f}x fp32" if fp32 and mine and self.chosen != "fp32" else ""
        source = "cached measurement" if self.cached else "measured"
        return f"auto: {source} {measured}{skipped}: {self.chosen}{ratio}"


def cache_file() -> Path:
    """CHARSTREAM_CACHE_DIR/precision.json, else the user's cache folder's charstream/precision.json."""
    own = os.environ.get("CHARSTREAM_CACHE_DIR")
    root = Path(own) if own else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "charstream"
    return root / "precision.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def choose(seconds_per_step: dict[str, float]) -> str:
    """The fastest precision measured, unless it is within 5% of fp32: then fp32."""
    fastest = min(seconds_per_step, key=seconds_per_step.__getitem__)
    return fastest if seconds_per_step[fastest] * KEEP_FP32_WITHIN < seconds_per_step["fp32"] else "fp32"


def cache_key(model: nn.Module, device: torch.device, batch: int, seq: int) -> str:
    config = getattr(model, "config", None)
    shape = (
        f"{config.cell} {config.num_layers}x{config.hidden_size} emb {config.embedding_size} vocab {config.vocab_size}"
        if config is not None
        else type(model).__name__
    )
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    where = f"{device.type}:{device_name(device)}|threads {threads}|torch {torch.__version__}"
    return f"{where}|{shape}|batch {batch}x{seq}"


def calibrate(model: nn.Module, cell: str, vocab_size: int, device: torch.device, batch: int, seq: int) -> Calibration:
    """The precision this run trains fastest in, measured (or read from the cache)."""
    key = cache_key(model, device, batch, seq)
    cached = _read_cache().get(key)
    if cached is not None:
        return Calibration(cached["chosen"], cached["seconds_per_step"], cached.get("skipped", {}), key, cached=True)
    timings: dict[str, float] = {}
    skipped: dict[str, str] = {}
    candidates = CANDIDATES.get(device.type, ("fp32",))
    deadline = time.monotonic() + BUDGET_S
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = copy.deepcopy(model).to(device).train()
        tokens = torch.randint(0, vocab_size, (batch, seq + 1), device=device)
        for name in sorted(candidates, key=lambda n: n != "fp32"):  # fp32 first: the yardstick
            if name != "fp32" and (why := cannot_run(name, device, cell)):
                skipped[name] = why
                continue
            share = (deadline - time.monotonic()) / max(1, len(candidates) - len(timings) - len(skipped))
            timings[name] = _seconds_per_step(probe, tokens, Precision(name, device.type, "calibrating"), share)
    result = Calibration(choose(timings), timings, skipped, key)
    _write_cache(key, result)
    return result


def measured_choice(
    model: nn.Module, cell: str, vocab_size: int, device: torch.device, batch: int, seq: int, record: Path | None
) -> tuple[str, str]:
    """`calibrate`'s choice and the line that says why; written to `record` (the run's folder) as JSON."""
    result = calibrate(model, cell, vocab_size, device, batch, seq)
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(asdict(result), indent=1) + "\n")
    return result.chosen, result.reason()


def _seconds_per_step(model: nn.Module, tokens: torch.Tensor, precision: Precision, budget_s: float) -> float:
    """Median seconds of a forward and backward pass in `precision`, after one untimed warm-up."""
    loss_of = nn.CrossEntropyLoss()

    def one_step() -> float:
        started = time.perf_counter()
        with precision.autocast():
            logits, _ = model(tokens[:, :-1])
            loss = loss_of(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        if tokens.device.type == "cuda":
            torch.cuda.synchronize(tokens.device)
        return time.perf_counter() - started

    started = time.monotonic()
    first = one_step()  # kernels chosen, caches warmed
    steps = [one_step()]
    while len(steps) < TIMED_STEPS and time.monotonic() - started + first < budget_s:
        steps.append(one_step())
    return statistics.median(steps)


def _read_cache() -> dict[str, dict]:  # type: ignore[type-arg]
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, result: Calibration) -> None:
    entries = _read_cache()
    entries[key] = {k: v for k, v in asdict(result).items() if k in ("chosen", "seconds_per_step", "skipped")}
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(entries, indent=1))
        temporary.replace(path)  # whole or not at all, also with two runs writing at once
    except OSError:
        pass  # a read-only home: the next run measures again

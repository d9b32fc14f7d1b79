"""Mixed precision for training: which dtype the forward pass and the loss run in, and why.

Only the forward pass and the loss run under `torch.autocast`; the weights, the optimizer state,
the carried state and the checkpoints stay float32, and validation and export run in float32
outside autocast. `auto` is decided by measurement (calibrate.py): a few steps of each precision
the device can run, on the run's own model and batch. A precision the device's kernels cannot run
for the run's cell is refused when asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from training.config import PRECISIONS
from training.errors import InvalidSetting
from training.model import RNN_CLASSES

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32, bf16 or fp16
    device_type: str  # cpu or cuda
    reason: str  # why, said at the start of a run

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.name)

    @property
    def scales_loss(self) -> bool:
        """fp16 needs its loss scaled so small gradients do not underflow; bf16 has fp32's range."""
        return self.name == "fp16"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward pass and the loss in this precision; a no-op for fp32."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype):
            yield


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bfloat16 features (avx512_bf16, amx_bf16) as /proc/cpuinfo and torch see them:
    facts a benchmark reports beside what it measured, never what `auto` decides by."""
    found: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                found.update(f for f in line.split(":", 1)[1].split() if f in ("avx512_bf16", "amx_bf16"))
                break
    # torch's own checks cover machines without /proc/cpuinfo.
    if torch.cpu._is_avx512_bf16_supported():
        found.add("avx512_bf16")
    if torch.cpu._is_amx_tile_supported():
        found.add("amx_bf16")
    return sorted(found)


def cannot_run(name: str, device: torch.device, cell: str) -> str | None:
    """Why a `cell` layer cannot train under `name` autocast on `device`, or None when it can.

    Native support is a property of the kernels, not only of the flags: oneDNN has no bf16 LSTM
    primitive on a CPU without AVX-512, while GRU and RNN fall back to other kernels there. So a
    two-step forward and backward of a tiny layer of the run's own cell is tried, which costs
    milliseconds."""
    dtype = _DTYPES.get(name)
    if dtype is None:
        return None
    # The probe draws its weights and inputs from forked generators: the run's seeded ones are untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        layer = RNN_CLASSES[cell](4, 8, num_layers=1, batch_first=True).to(device)
        try:
            with torch.autocast(device.type, dtype=dtype):
                out, _ = layer(torch.randn(2, 2, 4, device=device))
            out.float().sum().backward()
        except RuntimeError as exc:
            return str(exc).splitlines()[0].split(". ")[0]
    return None


def resolve(
    name: str, device: torch.device, cell: str = "lstm", measure: Callable[[], tuple[str, str]] | None = None
) -> Precision:
    """The precision a run trains in: `name` as asked, or for `auto` what `measure` found fastest
    (its choice and the reason to say); without a measurement `auto` is fp32."""
    if name not in PRECISIONS:
        raise InvalidSetting(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}", ("precision",))
    if name == "auto":
        if measure is None:
            return Precision("fp32", device.type, "auto: nothing measured, so fp32")
        chosen, reason = measure()
        return Precision(chosen, device.type, reason)
    precision = _resolve(name, device)
    if precision.dtype is not None and (why := cannot_run(precision.name, device, cell)):
        if name == "auto":
            return Precision("fp32", device.type, f"auto: {precision.name} cannot run a {cell} here ({why})")
        where = "CUDA device" if device.type == "cuda" else "CPU"
        raise InvalidSetting(
            f"precision {name} asked for, but this {where} cannot train a {cell} in it: {why}", ("precision",)
        )
    return precision


def _resolve(name: str, device: torch.device) -> Precision:
    kind = device.type
    if kind == "cuda":
        native_bf16 = torch.cuda.is_bf16_supported()
        if name == "bf16" and not native_bf16:
            raise InvalidSetting("precision bf16 asked for, but this CUDA device does not support it", ("precision",))
        return Precision(name, kind, "as asked")
    if name == "fp16":
        raise InvalidSetting("precision fp16 needs a CUDA device; on a CPU use bf16 or fp32", ("precision",))
    return Precision(name, kind, "as asked")

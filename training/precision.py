"""Mixed precision for training: which dtype the forward pass and the loss run in, and why.

Only the forward pass and the loss run under `torch.autocast`; the weights, the optimizer state,
the carried state and the checkpoints stay float32, and validation and export run in float32
outside autocast. `auto` picks bfloat16 only where it trains faster: a CUDA device that supports
it, or a CPU with AMX (amx_bf16). A CPU with AVX-512 BF16 but no AMX multiplies bf16 matrices
faster than fp32 ones, yet trains an LSTM slower under autocast: measured on this project's AMD
EPYC (avx512_bf16, no AMX), a 2x512 LSTM step took 3.1x as long in bf16 as in fp32 (oneDNN's bf16
recurrent kernels), so `auto` stays float32 there; `--precision bf16` still forces it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from training.config import PRECISIONS
from training.errors import InvalidSetting

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
    """The CPU's native bfloat16 features (avx512_bf16, amx_bf16) as /proc/cpuinfo and torch see them."""
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


def resolve(name: str, device: torch.device) -> Precision:
    """The precision a run trains in: `name` as asked, or for `auto` what this device runs fast."""
    if name not in PRECISIONS:
        raise InvalidSetting(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}", ("precision",))
    kind = device.type
    if kind == "cuda":
        native_bf16 = torch.cuda.is_bf16_supported()
        if name == "bf16" and not native_bf16:
            raise InvalidSetting("precision bf16 asked for, but this CUDA device does not support it", ("precision",))
        if name == "auto":
            if native_bf16:
                return Precision("bf16", kind, "auto: this CUDA device supports bf16")
            return Precision("fp32", kind, "auto: this CUDA device lacks bf16")
        return Precision(name, kind, "as asked")
    if name == "fp16":
        raise InvalidSetting("precision fp16 needs a CUDA device; on a CPU use bf16 or fp32", ("precision",))
    if name == "auto":
        flags = cpu_bf16_flags()
        if "amx_bf16" in flags:
            return Precision("bf16", kind, f"auto: this CPU has AMX ({', '.join(flags)})")
        if flags:
            return Precision("fp32", kind, f"auto: this CPU has {', '.join(flags)} but no AMX; bf16 LSTMs train slower")
        return Precision("fp32", kind, "auto: this CPU has no native bf16 (no avx512_bf16 or amx_bf16)")
    return Precision(name, kind, "as asked")

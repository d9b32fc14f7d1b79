"""Reading the hashed locks in requirements/ (what `make lock` writes with uv pip compile)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name
from packaging.version import Version

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements"
LOCKS = {"serve": "serve.txt", "train": "train.txt", "dev": "dev.txt"}
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+?)(?:\s*;\s*(?P<marker>[^\\]+?))?\s*\\?$")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Pin:
    name: str  # canonical: lower case, runs of -_. as one -
    version: Version
    marker: Marker | None
    hashes: tuple[str, ...]

    def line(self) -> str:
        """The requirement as pip takes it in --require-hashes mode, without its marker."""
        return f"{self.name}=={self.version} " + " ".join(f"--hash=sha256:{h}" for h in self.hashes)


def read_lock(path: Path) -> list[Pin]:
    """Every pin, in the lock's order; a name may be pinned twice under exclusive markers."""
    pins: list[Pin] = []
    current: tuple[str, Version, Marker | None] | None = None
    hashes: list[str] = []

    def close() -> None:
        if current is not None:
            name, version, marker = current
            pins.append(Pin(name, version, marker, tuple(hashes)))

    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if match := _PIN.match(line):
            close()
            marker = match["marker"]
            current = (
                canonicalize_name(match["name"]),
                Version(match["version"]),
                Marker(marker.strip()) if marker else None,
            )
            hashes = []
        hashes.extend(_HASH.findall(line))
    close()
    return pins


def for_linux_cpython_311(pins: list[Pin]) -> list[Pin]:
    """The pins some Linux CPython 3.11.x installs: a wheelhouse for any 3.11 base image."""
    environments = [
        {
            "sys_platform": "linux",
            "platform_system": "Linux",
            "platform_python_implementation": "CPython",
            "implementation_name": "cpython",
            "python_version": "3.11",
            "python_full_version": patch,
        }
        for patch in ("3.11.0", "3.11.2", "3.11.99")
    ]
    return [pin for pin in pins if pin.marker is None or any(pin.marker.evaluate(env) for env in environments)]

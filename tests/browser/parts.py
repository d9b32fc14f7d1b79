"""The real parts the browser tests need, installed by the project's own setup when missing:
Debian's chromium (driven by Playwright for Python, never a downloaded browser) and
onnxruntime-web's files under service/api/playground/static/ort/ (`make web`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.debian import CannotInstall, apt_install
from tests.utils import REPO

CHROMIUM = "/usr/bin/chromium"
# Headless on a machine that cannot reach outside hosts: without the networking flags Chromium
# keeps trying to, and waits on it.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ORT_WEB_STAMP = REPO / "service" / "api" / "playground" / "static" / "ort" / "VERSION"  # the Makefile's ORT_WEB_STAMP


class PartUnavailable(Exception):
    pass


def _apt_install(*packages: str) -> None:
    try:
        apt_install(*packages)
    except CannotInstall as exc:
        raise PartUnavailable(str(exc)) from None


def ensure_chromium() -> str:
    if not Path(CHROMIUM).exists():
        _apt_install("chromium")
    return CHROMIUM


def ensure_ort_web() -> Path:
    """onnxruntime-web's files, installed with `make web` (npm at setup time only)."""
    if not ORT_WEB_STAMP.is_file():
        if not shutil.which("npm"):
            _apt_install("npm")
        result = subprocess.run(["make", "web"], cwd=REPO, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise PartUnavailable(f"make web failed: {(result.stdout + result.stderr)[-2000:]}")
    return ORT_WEB_STAMP.parent

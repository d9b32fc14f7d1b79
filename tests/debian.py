"""Installing the real parts the tests use from Debian's packages, when they are missing."""

from __future__ import annotations

import os
import shutil
import subprocess


class CannotInstall(Exception):
    """A part is missing and this machine cannot install it (not root, or no apt-get)."""


def apt_install(*packages: str) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise CannotInstall(f"cannot install {' '.join(packages)}: not root or no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *packages], check=True, capture_output=True, env=env, timeout=900
    )

"""Finding or preparing a container engine for the smoke test: Docker when an engine answers,
otherwise Podman (installed from Debian's packages when absent), with a locally made base image
when the registry cannot be reached, and Python packages from a wheelhouse built on the host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.debian import CannotInstall, apt_install
from tests.locks import LOCKS, REQUIREMENTS, for_linux_cpython_311, read_lock

REPO = Path(__file__).resolve().parents[2]
LOCAL_BASE = "localhost/python:3.11-slim"
DEFAULT_BASE = "python:3.11-slim"
DEPLOY_IMAGES = ("redis:7", "nginx:1.27")
LOCAL_DEPLOY_PARTS = "localhost/charstream-deploy-parts:bookworm"


class EngineUnavailable(Exception):
    pass


@dataclass
class Engine:
    command: str  # docker or podman
    env: dict[str, str] = field(default_factory=dict)
    compose: list[str] = field(default_factory=list)

    def run(
        self, *args: str, check: bool = True, timeout: float = 600, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.command, *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self.env},
            **kw,  # type: ignore[call-overload]
        )

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False).returncode == 0


def _ok(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _apt_install(*packages: str) -> None:
    try:
        apt_install(*packages)
    except CannotInstall as exc:
        raise EngineUnavailable(f"no container engine, and {exc}") from None


def find_engine() -> Engine:
    if shutil.which("docker") and _ok(["docker", "info"]):
        compose = ["docker", "compose"] if _ok(["docker", "compose", "version"]) else []
        return Engine("docker", compose=compose)
    if not (shutil.which("podman") and shutil.which("podman-compose") and shutil.which("debootstrap")):
        _apt_install("podman", "runc", "debootstrap", "podman-compose")
    # runc as the runtime and no default ulimits: what this kind of machine accepts.
    engine = Engine("podman", env={"CONTAINERS_CONF": str(REPO / "tests" / "container" / "containers.conf")})
    engine.compose = ["podman-compose"]
    return engine


def base_image(engine: Engine) -> str:
    """python:3.11-slim if present or pullable; else a Debian bookworm rootfs made with debootstrap."""
    for ref in (DEFAULT_BASE, LOCAL_BASE):
        if engine.image_exists(ref):
            return ref
    if engine.run("pull", "-q", DEFAULT_BASE, check=False, timeout=120).returncode == 0:
        return DEFAULT_BASE
    _import_rootfs(engine, LOCAL_BASE, "python3,python3-venv,ca-certificates")
    return LOCAL_BASE


def _import_rootfs(engine: Engine, ref: str, packages: str) -> None:
    """A Debian bookworm rootfs with `packages`, made with debootstrap, slimmed, imported as `ref`.

    In a minbase rootfs there is no init, so the packages' scripts start no service."""
    if not shutil.which("debootstrap"):
        _apt_install("debootstrap")
    with tempfile.TemporaryDirectory(prefix="charstream-rootfs-") as root:
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={packages}", "bookworm", root],
            check=True,
            capture_output=True,
            timeout=900,
        )
        # Slim it as python:3.11-slim is slimmed: no package caches, docs, manuals or locales.
        for junk in (
            "var/cache/apt",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/locale",
            "usr/share/info",
            "var/log",
        ):
            target = Path(root) / junk
            if target.is_dir():
                for child in target.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        with subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE) as tar:
            engine.run("import", "-", ref, stdin=tar.stdout, timeout=600)


def deploy_images(engine: Engine) -> None:
    """The images compose.scale.yaml names besides charstream's (redis:7, nginx:1.27): present,
    pulled, or one Debian rootfs with Debian's redis-server and nginx tagged with both names, so
    the compose file runs unchanged. Kept for the next run, as the base image is."""
    missing = [ref for ref in DEPLOY_IMAGES if not engine.image_exists(ref)]
    if not missing:
        return
    if all(engine.run("pull", "-q", ref, check=False, timeout=120).returncode == 0 for ref in missing):
        return
    if not engine.image_exists(LOCAL_DEPLOY_PARTS):
        _import_rootfs(engine, LOCAL_DEPLOY_PARTS, "redis-server,nginx-light,curl")
    for ref in DEPLOY_IMAGES:
        if not engine.image_exists(ref):
            engine.run("tag", LOCAL_DEPLOY_PARTS, ref)


def build_wheelhouse(*locks: str) -> Path:
    """Wheels of what the named locks (requirements/<lock>.txt) install on any Linux CPython 3.11,
    checked against the lock's hashes on the host, so the image builds with no index and installs
    the same files with --require-hashes."""
    pins = {
        pin.line(): pin
        for lock in locks or ("serve",)
        for pin in for_linux_cpython_311(read_lock(REQUIREMENTS / LOCKS[lock]))
    }
    wheelhouse = REPO / "wheelhouse"
    for old in wheelhouse.glob("*.whl"):  # a wheel of an earlier lock would only sit there
        if not any(
            old.name.lower().startswith(f"{pin.name.replace('-', '_')}-{pin.version}-") for pin in pins.values()
        ):
            old.unlink()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="charstream-wheelhouse-") as requirements:
        requirements.write("\n".join(pins) + "\n")
        requirements.flush()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "--require-hashes",
                "--wheel-dir",
                str(wheelhouse),
                "-r",
                requirements.name,
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    return wheelhouse

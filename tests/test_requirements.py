"""The hashed locks in requirements/ agree with pyproject.toml: every requirement is pinned within
its range, nothing is pinned that no requirement needs, every pin carries hashes, the images' locks
pin what the test environment runs, and onnxruntime-web's package-lock names what package.json does.
A change to pyproject.toml without `make lock` fails here."""

from __future__ import annotations

import importlib.metadata
import json
import sys

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.locks import LOCKS, REQUIREMENTS, Pin, read_lock
from tests.utils import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# What each lock is compiled from besides the package's own dependencies (the Makefile's lock target).
LOCK_INPUTS = {
    "serve": (["serve"], ["build.in"]),
    "train": (["train"], ["build.in", "torch-cpu.in"]),
    "dev": (["train", "serve", "dev"], ["build.in", "torch-cpu.in"]),
}
# The environments the locks are compiled for: Python 3.11 on every platform ([tool.uv] environments).
ENVIRONMENTS = [
    {
        "sys_platform": platform,
        "platform_system": system,
        "os_name": "nt" if platform == "win32" else "posix",
        "platform_python_implementation": implementation,
        "implementation_name": implementation.lower(),
        "platform_machine": "x86_64",
        "python_version": "3.11",
        "python_full_version": patch,
    }
    for platform, system in (("linux", "Linux"), ("darwin", "Darwin"), ("win32", "Windows"))
    for patch in ("3.11.0", "3.11.99")
    for implementation in ("CPython", "PyPy")
]


def _in_file(name: str) -> list[Requirement]:
    lines = (REQUIREMENTS / name).read_text(encoding="utf-8").splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


def roots(lock: str) -> list[Requirement]:
    extras, files = LOCK_INPUTS[lock]
    requirements = [Requirement(r) for r in PROJECT["dependencies"]]
    requirements += [Requirement(r) for extra in extras for r in PROJECT["optional-dependencies"][extra]]
    return requirements + [r for name in files for r in _in_file(name)]


def applies(requirement: Requirement, extra: str = "") -> bool:
    marker = requirement.marker
    return marker is None or any(marker.evaluate({**env, "extra": extra}) for env in ENVIRONMENTS)


def needed(requirements: list[Requirement]) -> set[str]:
    """The names these requirements reach, through the installed distributions' own metadata
    (the test environment is installed from the dev lock, which holds every version the others pin)."""
    seen: set[tuple[str, str]] = set()
    queue = [(canonicalize_name(r.name), sorted(r.extras)) for r in requirements if applies(r)]
    while queue:
        name, extras = queue.pop()
        for extra in ["", *extras]:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            try:
                requires = importlib.metadata.distribution(name).requires or []
            except importlib.metadata.PackageNotFoundError:
                continue  # a package for another platform: pinned, not installed here
            for line in requires:
                r = Requirement(line)
                # An extra adds what its marker admits beyond the package's own requirements.
                if applies(r, extra) and (extra == "" or not applies(r)):
                    queue.append((canonicalize_name(r.name), sorted(r.extras)))
    return {name for name, _ in seen}


def pins_by_name(lock: str) -> dict[str, list[Pin]]:
    out: dict[str, list[Pin]] = {}
    for pin in read_lock(REQUIREMENTS / LOCKS[lock]):
        out.setdefault(pin.name, []).append(pin)
    return out


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_requirement_is_pinned_within_its_range(lock: str) -> None:
    pins = pins_by_name(lock)
    for requirement in roots(lock):
        if not applies(requirement):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is required by pyproject.toml but not in {LOCKS[lock]}: run make lock"
        for pin in pins[name]:
            assert requirement.specifier.contains(pin.version, prereleases=True), (
                f"{LOCKS[lock]} pins {name}=={pin.version}, outside pyproject.toml's {requirement}: run make lock"
            )


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_nothing_is_pinned_that_no_requirement_needs(lock: str) -> None:
    # Checked for the pins this environment installs: the metadata of the others' parents is not here.
    here = {pin.name for pin in read_lock(REQUIREMENTS / LOCKS[lock]) if pin.marker is None or pin.marker.evaluate()}
    stale = sorted(here - needed(roots(lock)))
    assert not stale, f"{LOCKS[lock]} pins what pyproject.toml no longer needs: {stale}; run make lock"


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_pin_carries_hashes(lock: str) -> None:
    for pin in read_lock(REQUIREMENTS / LOCKS[lock]):
        assert pin.hashes, f"{pin.name} has no --hash in {LOCKS[lock]}"


@pytest.mark.parametrize("lock", ["serve", "train"])
def test_images_pin_what_the_tests_run(lock: str) -> None:
    dev = {(p.name, p.version) for p in read_lock(REQUIREMENTS / "dev.txt")}
    for pin in read_lock(REQUIREMENTS / LOCKS[lock]):
        assert (pin.name, pin.version) in dev, f"{LOCKS[lock]} pins {pin.name}=={pin.version}, dev.txt does not"


def test_the_serving_lock_has_no_torch() -> None:
    assert not {"torch", "onnx"} & set(pins_by_name("serve"))


def test_this_environment_is_the_dev_lock() -> None:
    mismatched = []
    for pin in read_lock(REQUIREMENTS / "dev.txt"):
        if pin.marker is not None and not pin.marker.evaluate():
            continue
        installed = importlib.metadata.version(pin.name)
        if installed != str(pin.version):
            mismatched.append(f"{pin.name} {installed} (lock: {pin.version})")
    assert not mismatched, f"installed outside the lock ({sys.prefix}): {mismatched}"


def test_onnxruntime_web_is_locked_with_integrity_hashes() -> None:
    manifest = json.loads((REQUIREMENTS / "web" / "package.json").read_text(encoding="utf-8"))
    lock = json.loads((REQUIREMENTS / "web" / "package-lock.json").read_text(encoding="utf-8"))
    assert lock["packages"][""]["dependencies"] == manifest["dependencies"]
    wanted = manifest["dependencies"]["onnxruntime-web"]
    assert lock["packages"]["node_modules/onnxruntime-web"]["version"] == wanted
    for path, package in lock["packages"].items():
        if path:
            assert package.get("integrity", "").startswith("sha512-"), f"{path} has no integrity hash"

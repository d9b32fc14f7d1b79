"""Every Python example and every curl command in README.md and docs/ that talks to a server runs
against a live one (the bundled model, as `make serve` serves it), with the address it names
pointed at that server; each must exit 0 and print JSON or text where it prints at all, without a
traceback. Examples that need a value from an earlier step (a session id in $SID) or another
machine (a container, a cluster) are left out by what they contain, not by name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.utils import REPO, ServeProcess, serve_process

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ADDRESS = re.compile(r"(?:http://|ws://)?(?:127\.0\.0\.1|localhost):8000")
PYTHON = re.compile(r"```python\n(.*?)```", re.S)
SHELL = re.compile(r"```(?:sh|bash|console|)\n(.*?)```", re.S)


def python_examples() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for i, block in enumerate(PYTHON.findall(page.read_text(encoding="utf-8"))):
            if ADDRESS.search(block):
                found.append((f"{page.name}:python{i}", block))
    return found


def shell_commands(block: str) -> Iterator[str]:
    """The commands of a shell block: a newline ends one unless it is quoted or escaped; comments dropped."""
    command, quote, i = [], "", 0
    while i < len(block):
        c = block[i]
        if c == "\\" and not quote and block[i + 1 : i + 2] == "\n":
            i += 2
            continue
        if c in "'\"" and (not quote or quote == c):
            quote = "" if quote else c
        elif c == "#" and not quote and (not command or command[-1] in " \n"):
            while i < len(block) and block[i] != "\n":
                i += 1
            continue
        elif c == "\n" and not quote:
            yield "".join(command).strip()
            command = []
            i += 1
            continue
        command.append(c)
        i += 1
    yield "".join(command).strip()


def curl_commands() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for page in PAGES:
        commands = [c for block in SHELL.findall(page.read_text(encoding="utf-8")) for c in shell_commands(block)]
        for command in commands:
            needs_more = "$" in command or ">" in command  # a value from an earlier step, a file
            if command.startswith("curl ") and ADDRESS.search(command) and not needs_more:
                found.append((f"{page.name}:curl{len([w for w, _ in found if w.startswith(page.name)])}", command))
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp("examples") / "server.log"
    with serve_process(log, CHARSTREAM_MODELS_DIR=str(REPO / "exports")) as s:
        yield s


def pointed_at(text: str, server: ServeProcess) -> str:
    host = server.base_url.removeprefix("http://")
    return ADDRESS.sub(lambda m: m.group(0).replace("127.0.0.1:8000", host).replace("localhost:8000", host), text)


@pytest.mark.parametrize(("where", "code"), python_examples(), ids=[w for w, _ in python_examples()])
def test_python_example_runs(server: ServeProcess, where: str, code: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", pointed_at(code, server)],
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, f"{where}:\n{run.stderr[-2000:]}"
    assert "Traceback" not in run.stderr
    if "print(" in code:
        assert run.stdout.strip(), f"{where} printed nothing"


@pytest.mark.parametrize(("where", "command"), curl_commands(), ids=[w for w, _ in curl_commands()])
def test_curl_example_runs(server: ServeProcess, where: str, command: str) -> None:
    run = subprocess.run(
        ["bash", "-c", pointed_at(command, server) + " --fail-with-body"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, f"{where}: {run.stdout[-500:]} {run.stderr[-500:]}"
    assert run.stdout.strip(), f"{where} answered nothing"


def test_the_examples_were_found() -> None:
    """The collector finds what the pages hold (a regex that matched nothing would pass every test)."""
    assert len(python_examples()) >= 8 and len(curl_commands()) >= 8
    assert any(where.startswith("README.md") for where, _ in python_examples() + curl_commands())

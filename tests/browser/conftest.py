from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.parts import CHROMIUM_ARGS, PartUnavailable, ensure_chromium, ensure_ort_web
from tests.parts import part_missing
from tests.utils import Server, run_server


@pytest.fixture(scope="session")
def chromium(pytestconfig: pytest.Config) -> str:
    try:
        return ensure_chromium()
    except PartUnavailable as exc:
        part_missing(pytestconfig, "Chromium", "apt-get install -y chromium", str(exc))


@pytest.fixture(scope="session")
def ort_web(pytestconfig: pytest.Config) -> Path:
    try:
        return ensure_ort_web()
    except PartUnavailable as exc:
        part_missing(pytestconfig, "onnxruntime-web", "apt-get install -y npm && make web", str(exc))


@pytest.fixture(scope="session")
def playground_models(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, corpus_file: Path) -> Path:
    """The tiny models, each with a cell report made by the real finder."""
    from interpret import write_report

    out = tmp_path_factory.mktemp("playground-models")
    for name in ("tiny-lstm", "tiny-gru"):
        shutil.copytree(models_dir / name, out / name)
        write_report(out / name, [str(corpus_file)], out / f"{name}-report", max_chars=2000, top=4, images=False)
    return out


@pytest.fixture(scope="module")
def server(playground_models: Path, ort_web: Path) -> Iterator[Server]:
    with run_server(
        models_dir=playground_models, default_model="tiny-lstm", max_new_chars=100_000, max_prompt_chars=20_000
    ) as s:
        yield s


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Tab:
    """One page of the playground, with the console errors and uncaught exceptions it had."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield Tab(page)
    finally:
        context.close()

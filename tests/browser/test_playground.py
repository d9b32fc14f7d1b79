"""The playground in a real headless Chromium against a real server on 127.0.0.1, with real tiny models.

Every wait is bounded; nothing here asserts a duration.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import Tab
from tests.utils import REPO, Server, run_server

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(600)]

OUTPUT = "[data-testid=output]"
DONE = "() => document.querySelector('[data-testid=output]').dataset.running === 'false'"
SHOTS = REPO / "docs" if os.environ.get("CHARSTREAM_UPDATE_SCREENSHOTS") else None


def open_page(tab: Tab, server: Server, viewport: tuple[int, int] | None = None) -> Any:
    page = tab.page
    if viewport:
        page.set_viewport_size({"width": viewport[0], "height": viewport[1]})
    page.goto(server.base_url + "/")
    page.wait_for_selector("body[data-ready=true]")
    return page


def fill(page: Any, **values: object) -> None:
    for testid, value in values.items():
        page.fill(f"[data-testid={testid.replace('_', '-')}]", str(value))


def run(page: Any, button: str = "generate", timeout: float = 60_000) -> dict[str, Any]:
    """Click a button that generates and wait for the end; the page's record of the run."""
    page.click(f"[data-testid={button}]")
    page.wait_for_function(DONE, timeout=timeout)
    last: dict[str, Any] = page.evaluate("window.playground.lastRun")
    return last


def text(page: Any) -> str:
    value: str = page.eval_on_selector(OUTPUT, "el => el.textContent")
    return value


def backgrounds(page: Any) -> list[str]:
    values: list[str] = page.eval_on_selector(OUTPUT, "el => [...el.children].map(s => s.style.backgroundColor)")
    return values


def all_coloured(page: Any) -> None:
    page.wait_for_function(
        "() => { const c = [...document.querySelector('[data-testid=output]').children];"
        " return c.length > 0 && c.every(s => s.style.backgroundColor); }"
    )


def unit_options(page: Any) -> list[str]:
    values: list[str] = page.eval_on_selector_all("[data-testid=unit] option", "os => os.map(o => o.value)")
    return [v for v in values if v]


def select_unit_for(page: Any, feature: str) -> None:
    """Colour by the cell finder's best unit for `feature` (the option labelled with its name)."""
    options = page.eval_on_selector_all("[data-testid=unit] option", "os => os.map(o => [o.value, o.textContent])")
    page.select_option("[data-testid=unit]", next(value for value, label in options if label.startswith(feature)))


def server_greedy(server: Server, model: str, prompt: str, length: int) -> str:
    body = {"model": model, "prompt": prompt, "max_new_chars": length, "temperature": 0}
    r = httpx.post(server.base_url + "/v1/generate", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return prompt + str(r.json()["text"])


def test_page_loads_with_labelled_controls_and_no_errors(tab: Tab, server: Server) -> None:
    page = open_page(tab, server)
    models = page.eval_on_selector_all("[data-testid=model] option", "os => os.map(o => o.value)")
    assert models == ["tiny-gru", "tiny-lstm"] or sorted(models) == ["tiny-gru", "tiny-lstm"]
    assert page.eval_on_selector("[data-testid=model]", "el => el.value") == "tiny-lstm"
    assert len(unit_options(page)) >= 4  # the cell report's units, per feature
    assert "onnxruntime-web" in page.inner_text("[data-testid=browser-note]")
    unlabelled = page.evaluate(
        "() => [...document.querySelectorAll('input, select, textarea, button')]"
        ".filter(el => el.closest('dialog') === null || el.closest('dialog').open)"
        ".filter(el => el.tagName === 'BUTTON' ? !el.textContent.trim()"
        " : !(el.labels.length || el.getAttribute('aria-label')))"
        ".map(el => el.id)"
    )
    assert unlabelled == []
    for testid in ("prompt", "generate", "stop", "output", "unit", "mode"):
        assert page.locator(f"[data-testid={testid}]").count() == 1
    run(page)
    assert tab.errors == []


def test_generation_streams_in_and_stops(tab: Tab, server: Server) -> None:
    page = open_page(tab, server)
    fill(page, length=3000, temperature=1)
    # Record the text's length at every change of the output: streaming shows many.
    page.evaluate(
        "() => { window.lengths = []; const out = document.querySelector('[data-testid=output]');"
        " new MutationObserver(() => window.lengths.push(out.textContent.length))"
        ".observe(out, {childList: true}); }"
    )
    last = run(page)
    assert last["generated"] == 3000 and last["finish"] == "length"
    lengths = page.evaluate("window.lengths")
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths)

    fill(page, length=100_000)
    page.click("[data-testid=generate]")
    page.wait_for_function("() => document.querySelector('[data-testid=output]').textContent.length > 200")
    page.click("[data-testid=stop]")
    page.wait_for_function(DONE)
    last = page.evaluate("window.playground.lastRun")
    assert last["finish"] == "cancelled" and 0 < last["generated"] < 100_000
    assert page.inner_text("[data-testid=status]") == "stopped"
    assert tab.errors == []


def test_fork_continue_and_reset(tab: Tab, server: Server) -> None:
    page = open_page(tab, server)
    fill(page, length=40, temperature=0.9, seed=3)
    run(page)
    first = text(page)
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 40

    page.click("[data-testid=fork]")
    page.wait_for_function("() => document.querySelectorAll('[data-testid=session]').length === 2")
    assert text(page) == first
    fill(page, length=30)
    run(page, "continue")
    forked = text(page)
    assert forked.startswith(first) and len(forked) == len(first) + 30

    page.locator("[data-testid=session]").first.click()
    assert text(page) == first  # the original session is untouched by its fork
    run(page, "continue")
    original = text(page)
    assert original.startswith(first) and len(original) == len(first) + 30

    page.click("[data-testid=reset]")
    page.wait_for_function("() => document.querySelector('[data-testid=output]').textContent === ''")
    run(page, "continue")  # a reset session starts again from nothing
    assert len(text(page)) == 30
    assert tab.errors == []


@pytest.mark.parametrize("mode", ["server", "browser"])
def test_colouring_follows_the_chosen_unit(tab: Tab, server: Server, mode: str) -> None:
    page = open_page(tab, server)
    page.select_option("[data-testid=mode]", mode)
    fill(page, length=120, temperature=0)
    run(page)
    assert not any(backgrounds(page))  # no unit chosen: no colour
    options = unit_options(page)
    page.select_option("[data-testid=unit]", options[0])
    all_coloured(page)
    first = backgrounds(page)
    other = next(o for o in options if o.split(":")[:2] != options[0].split(":")[:2] or o != options[0])
    page.select_option("[data-testid=unit]", other)
    page.wait_for_function(
        "(before) => [...document.querySelector('[data-testid=output]').children]"
        ".some((s, i) => s.style.backgroundColor !== before[i])",
        arg=first,
    )
    all_coloured(page)
    assert backgrounds(page) != first
    # A unit typed by number, in another layer: the whole text is coloured by it too.
    fill(page, unit_layer=0, unit_index=5)
    page.select_option("[data-testid=unit-state]", "h")
    page.click("[data-testid=unit-apply]")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=unit-index]').value === '5'"
        " && window.playground.unit && window.playground.unit.unit === 5"
    )
    all_coloured(page)
    # New text is coloured as it arrives.
    run(page, "continue")
    all_coloured(page)
    assert tab.errors == []


@pytest.mark.parametrize("mode", ["server", "browser"])
def test_candidates_under_the_pointer(tab: Tab, server: Server, mode: str) -> None:
    page = open_page(tab, server)
    page.select_option("[data-testid=mode]", mode)
    fill(page, length=60, temperature=0)  # greedy: the character picked is the top candidate
    run(page)
    page.hover(f"{OUTPUT} span:nth-child(20)")
    rows = page.locator("[data-testid=candidates] tr")
    assert rows.count() >= 3
    assert "%" in rows.first.inner_text()
    chosen = page.locator("[data-testid=candidates] tr.chosen")
    assert chosen.count() == 1 and chosen.inner_text() == rows.first.inner_text()
    # From the keyboard: focus the text, move the pointer.
    page.focus(OUTPUT)
    page.keyboard.press("End")
    assert "character 65" in page.inner_text("[data-testid=candidates]")
    page.keyboard.press("ArrowLeft")
    assert "character 64" in page.inner_text("[data-testid=candidates]")
    assert tab.errors == []


@pytest.mark.parametrize(("model", "variant"), [("tiny-lstm", "fp32"), ("tiny-lstm", "int8"), ("tiny-gru", "fp32")])
def test_browser_greedy_text_equals_the_servers(
    tab: Tab, server: Server, playground_models: Path, model: str, variant: str
) -> None:
    page = open_page(tab, server)
    page.select_option("[data-testid=model]", model)
    page.select_option("[data-testid=mode]", "browser")
    page.select_option("[data-testid=variant]", variant)
    prompt = "KING RICHARD II:\nWhat"
    page.fill("[data-testid=prompt]", prompt)
    fill(page, length=300, temperature=0)
    last = run(page)
    assert last["mode"] == "browser" and last["variant"] == variant and last["generated"] == 300
    if variant == "fp32":
        expected = server_greedy(server, model, prompt, 300)
    else:  # the server runs fp32; the int8 file's greedy text as onnxruntime in Python reads it
        from exports.run import generate

        expected = prompt + generate(str(playground_models / model / "model.int8.onnx"), prompt, 300, 0.0, None).text
    assert text(page) == expected
    assert tab.errors == []


def test_keyboard_only(tab: Tab, server: Server) -> None:
    page = open_page(tab, server)
    fill(page, length=100_000, temperature=1)
    page.focus("[data-testid=prompt]")
    page.keyboard.press("Control+Enter")
    page.wait_for_function("() => document.querySelector('[data-testid=output]').textContent.length > 100")
    page.keyboard.press("Escape")
    page.wait_for_function(DONE)
    assert page.evaluate("window.playground.lastRun.finish") == "cancelled"
    # Tab reaches the controls in order; none is a trap.
    page.focus("[data-testid=prompt]")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.testid") == "generate"


def test_phone_sized_screen(tab: Tab, server: Server, tmp_path: Path) -> None:
    page = open_page(tab, server, viewport=(390, 844))
    fill(page, length=200, temperature=0.8, seed=2)
    run(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    for testid in ("prompt", "generate", "stop", "output"):
        box = page.locator(f"[data-testid={testid}]").bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)


@pytest.fixture
def keyed_server(playground_models: Path, ort_web: Path) -> Iterator[Server]:
    with run_server(models_dir=playground_models, default_model="tiny-lstm", api_key="open-sesame") as s:
        yield s


@pytest.mark.parametrize("mode", ["server", "browser"])
def test_the_page_asks_for_the_api_key(tab: Tab, keyed_server: Server, mode: str) -> None:
    page = tab.page
    page.goto(keyed_server.base_url + "/")  # the page itself needs no key
    page.wait_for_selector("[data-testid=key-dialog][open]")
    page.fill("[data-testid=api-key]", "open-sesame")
    page.click("[data-testid=api-key-submit]")
    page.wait_for_selector("body[data-ready=true]")
    page.select_option("[data-testid=mode]", mode)
    fill(page, length=50, temperature=0)
    last = run(page)  # WebSocket with the key as a subprotocol, or the model file with X-API-Key
    assert last["generated"] == 50
    assert httpx.get(keyed_server.base_url + "/v1/models/tiny-lstm/onnx").status_code == 401
    assert tab.errors == []


def test_without_onnxruntime_web_the_page_says_so(
    tab: Tab, server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from service.api.playground import routes as playground

    monkeypatch.setattr(playground, "ORT_DIR", tmp_path / "no-ort")
    page = open_page(tab, server)
    assert page.eval_on_selector("[data-testid=mode] option[value=browser]", "o => o.disabled")
    assert "not installed" in page.inner_text("[data-testid=browser-note]")
    run(page)  # the server side still works
    assert tab.errors == []


@pytest.fixture(scope="module")
def bundled_server(tmp_path_factory: pytest.TempPathFactory, ort_web: Path) -> Iterator[Server]:
    """The bundled Shakespeare model and the example Python model, with their committed cell reports."""
    models = tmp_path_factory.mktemp("bundled")
    shutil.copytree(REPO / "exports" / "shakespeare-lstm", models / "shakespeare-lstm")
    shutil.copytree(REPO / "exports" / "examples" / "python-lstm", models / "python-lstm")
    with run_server(models_dir=models, default_model="shakespeare-lstm") as s:
        yield s


def test_screenshots_of_the_bundled_model(tab: Tab, bundled_server: Server, tmp_path: Path) -> None:
    """The pictures in the README (written to docs/ with CHARSTREAM_UPDATE_SCREENSHOTS=1)."""
    out = SHOTS or tmp_path
    page = open_page(tab, bundled_server)
    fill(page, length=500, temperature=0.7, seed=11)
    page.fill("[data-testid=prompt]", "ROMEO:\nI pray thee")
    run(page)
    select_unit_for(page, "line_position")
    all_coloured(page)
    page.locator(f"{OUTPUT} span:visible").nth(60).hover()  # a character's tooltip (line breaks have no box)
    page.screenshot(path=str(out / "playground.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(out / "playground-phone.png"), full_page=False)
    assert (out / "playground.png").stat().st_size > 10_000

    # The Python model, run in the browser from its int8 file, coloured by its string cell.
    page.set_viewport_size({"width": 1280, "height": 900})
    page.select_option("[data-testid=model]", "python-lstm")
    page.select_option("[data-testid=mode]", "browser")
    page.select_option("[data-testid=variant]", "int8")
    page.fill("[data-testid=prompt]", "def parse(text):\n    if not text:\n        raise ValueError('")
    fill(page, length=400, temperature=0.5, seed=4)
    run(page)
    select_unit_for(page, "in_string")
    all_coloured(page)
    page.hover(f"{OUTPUT} span:nth-child(90)")
    page.screenshot(path=str(out / "playground-python.png"))
    assert tab.errors == []


def test_a_pasted_text_is_coloured_by_surprisal(tab: Tab, server: Server) -> None:
    page = open_page(tab, server)
    pasted = "ROMEO:\nWhat light is this? qxzqxzqxz"
    page.fill("[data-testid=prompt]", pasted)
    page.click("[data-testid=score]")
    all_coloured(page)
    assert text(page) == pasted
    bits = page.eval_on_selector(OUTPUT, "el => [...el.children].map(s => parseFloat(s.title))")
    # The same numbers the API gives, and the nonsense at the end is what surprises the model most.
    body = {"texts": [pasted], "logprobs": True}
    want = httpx.post(server.base_url + "/v1/score", json=body, timeout=30).json()["scores"][0]["logprobs"]
    assert bits == pytest.approx([-lp / 0.6931471805599453 for lp in want], abs=0.01)
    assert sum(bits[-9:]) / 9 > sum(bits[:-9]) / len(bits[:-9])
    # Unticked, the text is plain again.
    page.click("[data-testid=surprisal]")
    page.wait_for_function(
        "() => [...document.querySelector('[data-testid=output]').children].every(s => !s.style.backgroundColor)"
    )
    assert tab.errors == []


def test_the_slider_clamps_the_chosen_unit(tab: Tab, server: Server) -> None:
    page = open_page(tab, server)
    fill(page, length=40, temperature=0)
    page.select_option("[data-testid=unit]", unit_options(page)[0])
    page.eval_on_selector(
        "[data-testid=steer-value]", "el => { el.value = '3.5'; el.dispatchEvent(new Event('input')); }"
    )
    assert page.text_content("[data-testid=steer-shown]") == "3.5"
    page.check("[data-testid=steer-on]")
    run(page)
    unit = page.evaluate("window.playground.unit.unit")
    # Every generated character reads the unit after the step that wrote it: the clamped value.
    values = page.evaluate(
        "(u) => { const s = window.playground.current; const k = s.actUnits.units.indexOf(u);"
        " return s.acts.filter((a, i) => !s.prompt[i]).map(a => a[k]); }",
        unit,
    )
    assert len(values) == 40 and all(v == 3.5 for v in values)
    assert tab.errors == []

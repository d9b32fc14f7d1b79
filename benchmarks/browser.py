"""Generation speed in headless Chromium (onnxruntime-web, WebAssembly, one thread) beside the server's
single-stream speed, for the bundled model, side by side in one run.

  server ws     one WebSocket stream from the lean Python client (what the serving benchmark measures)
  page server   the playground in server mode: WebSocket stream, each character drawn in the page
  page browser  the playground running the .onnx itself (fp32, int8): step, sample, draw
  step loop     a bare greedy loop of onnxruntime-web steps in the page, nothing drawn

Each row is the median of interleaved rounds. Greedy decoding (temperature 0) everywhere.

    python -m benchmarks.browser [--chars 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.common import MODEL, free_port, start_charstream, table, write_results
from benchmarks.serving import ws_stream
from tests.browser.parts import CHROMIUM, CHROMIUM_ARGS

PROMPT = "ROMEO:"
DONE = "() => document.querySelector('[data-testid=output]').dataset.running === 'false'"

# A bare step loop in the page: the same module the playground uses, no drawing, no candidates.
STEP_LOOP = """
async ([model, variant, steps]) => {
  const m = await import("/static/browser-model.js");
  const res = await fetch(`/v1/models/${model}/onnx?variant=${variant}`);
  const net = await m.BrowserModel.load(await res.arrayBuffer());
  let out = await net.read(net.encode("ROMEO:"), net.zeroState());
  let logits = net.row(out.logits, 5);
  let state = out.state;
  const t0 = performance.now();
  for (let i = 0; i < steps; i++) {
    out = await net.read([m.argmax(logits)], state);
    logits = out.logits;
    state = out.state;
  }
  return steps / ((performance.now() - t0) / 1000);
}
"""


def server_ws(port: int, chars: int) -> float:
    """One WebSocket stream from the lean client, in a thread of its own: Playwright's sync API
    already runs an event loop in this one."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, ws_stream(port, chars, seed=1, prompt=PROMPT)).result()
    return chars / (time.perf_counter() - t0)


def page_run(page: Any, mode: str, variant: str, chars: int) -> float:
    page.select_option("[data-testid=mode]", mode)
    page.select_option("[data-testid=variant]", variant)
    page.fill("[data-testid=prompt]", PROMPT)
    page.fill("[data-testid=temperature]", "0")
    page.fill("[data-testid=length]", str(chars))
    page.click("[data-testid=generate]")
    page.wait_for_function(DONE, timeout=600_000)
    last: dict[str, Any] = page.evaluate("window.playground.lastRun")
    if last is None or last["generated"] != chars:
        raise RuntimeError(f"the page's run ended with {last}; status: {page.inner_text('[data-testid=status]')}")
    return float(last["charsPerSecond"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    server = start_charstream(free_port())
    samples: dict[str, list[float]] = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server.base + "/")
            page.wait_for_selector("body[data-ready=true]")
            version = page.inner_text("[data-testid=browser-note]")
            # Warm-up: the server's first steps, the page's model downloads and wasm compilation.
            server_ws(server.port, 200)
            for variant in ("fp32", "int8"):
                page_run(page, "browser", variant, 50)
            page_run(page, "server", "fp32", 50)
            for r in range(args.rounds):
                rows: dict[str, Callable[[], float]] = {
                    "server ws (Python client)": lambda: server_ws(server.port, args.chars),
                    "page, server mode": lambda: page_run(page, "server", "fp32", args.chars),
                    "page, browser mode fp32": lambda: page_run(page, "browser", "fp32", args.chars),
                    "page, browser mode int8": lambda: page_run(page, "browser", "int8", args.chars),
                    "step loop in page fp32": lambda: float(page.evaluate(STEP_LOOP, [MODEL, "fp32", args.chars])),
                    "step loop in page int8": lambda: float(page.evaluate(STEP_LOOP, [MODEL, "int8", args.chars])),
                }
                for name, measure in rows.items():
                    samples.setdefault(name, []).append(measure())
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
            chromium_version = browser.version
            browser.close()
    finally:
        server.stop()
    medians = {name: statistics.median(v) for name, v in samples.items()}
    server_speed = medians["server ws (Python client)"]
    rows_out = [[name, v, v / server_speed] for name, v in medians.items()]
    print(table(["measurement", "chars/s", "vs server ws"], rows_out))
    path = write_results(
        "browser",
        {
            "model": MODEL,
            "chars": args.chars,
            "rounds": args.rounds,
            "chromium": chromium_version,
            "onnxruntime_web": version,
            "chars_per_s": medians,
            "samples": samples,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()

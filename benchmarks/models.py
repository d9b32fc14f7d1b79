"""Models side by side: how well each predicts against what it costs to serve.

For each exported model folder and each variant (fp32, int8), in interleaved rounds:
- the validation loss its manifest records (measured at export, on the held-out split of its corpus);
- one step at batch 1 (median over pre-bound one-character steps, the server's onnxruntime
  threads): the pace of a single stream;
- the in-process ceiling at batch 64 (steps and sampling, no server): what 64 streams can get;
- a real server's 64 WebSocket streams (chars/s), the model served alone with the default settings.

    python -m benchmarks.models exports/shakespeare-lstm exports/examples/shakespeare-lstm-3x512
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import uvloop

from benchmarks import delivery, serving
from benchmarks.common import start_charstream, table, write_results
from exports import contract
from service.core import Engine
from service.settings import load_settings

VARIANTS = ("fp32", "int8")


def step_us(path: Path, steps: int) -> float:
    """Median microseconds of one batch-1 step on pre-bound buffers (the state carried, no sampling)."""
    bound = Engine(path, load_settings().ort_threads).binding(1)
    for _ in range(50):
        bound.run()
        bound.carry()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        bound.run()
        times.append(time.perf_counter() - t0)
        bound.carry()
    return statistics.median(times) * 1e6


def main() -> None:
    # One run read top to bottom (arguments, the runs side by side, the table, the results file):
    # its steps share the run's servers and numbers, so they stay in one function.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="exported model folders")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chars", type=int, default=400, help="characters per stream")
    parser.add_argument("--port", type=int, default=8871)
    parser.add_argument("--name", default="models", help="results file name")
    args = parser.parse_args()
    folders = [Path(m).resolve() for m in args.models]
    manifests = {f: json.loads((f / contract.MANIFEST_NAME).read_text()) for f in folders}
    cases = [(f, v) for f in folders for v in VARIANTS]
    servers = {
        case: start_charstream(args.port + i, models_dir=case[0].parent, model=case[0].name, variant=case[1])
        for i, case in enumerate(cases)
    }
    measured: dict[tuple[Path, str], dict[str, list[float]]] = {c: {"step": [], "ceiling": [], "ws": []} for c in cases}
    try:
        for server in servers.values():
            uvloop.run(delivery.run_streams(server.port, 100))  # warm-up
        for _ in range(args.rounds):
            for case, server in servers.items():
                path = case[0] / contract.VARIANT_FILES[case[1]]
                measured[case]["step"].append(step_us(path, 2000))
                measured[case]["ceiling"].append(serving.ceiling(delivery.STREAMS, 300, path))
                measured[case]["ws"].append(uvloop.run(delivery.run_streams(server.port, args.chars))[0])
    finally:
        for server in servers.values():
            server.stop()
    rows: list[dict[str, Any]] = []
    for folder, variant in cases:
        manifest = manifests[folder]
        found = {k: statistics.median(v) for k, v in measured[folder, variant].items()}
        rows.append(
            {
                "model": folder.name,
                "shape": f"{manifest['cell']} {manifest['num_layers']}x{manifest['hidden_size']}",
                "parameters": manifest["parameters"],
                "variant": variant,
                "val_loss": manifest["variants"][variant].get("val_loss"),
                "step_us_batch1": found["step"],
                "ceiling_batch64": found["ceiling"],
                "ws_64_streams": found["ws"],
            }
        )
    base = {r["variant"]: r for r in rows if r["model"] == folders[0].name}
    for r in rows:
        r["ws_vs_first"] = r["ws_64_streams"] / base[r["variant"]]["ws_64_streams"]
    headers = ["model", "shape", "parameters", "variant", "val loss", "step us (batch 1)", "ceiling chars/s (64)",
               "64 WebSocket streams chars/s", f"vs {folders[0].name}"]  # fmt: skip
    shown = [{**r, "val_loss": f"{r['val_loss']:.4f}", "ws_vs_first": f"{r['ws_vs_first']:.2f}"} for r in rows]
    print(table(headers, [list(r.values()) for r in shown]))
    path = write_results(args.name, {"rows": rows, "rounds": args.rounds, "chars": args.chars})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

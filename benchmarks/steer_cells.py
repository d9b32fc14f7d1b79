"""Steering the bundled model by two cells its cells.json names: the rate of capitals and the line lengths.

The capitals cell is the top unit of `upper_run` (within a run of capitals, the speaker names) and the
line cell the top positive unit of `line_position` (characters since the line began). Each is clamped
to a few values after every step; 32 samples of 400 characters per setting, the same seeds throughout.

    .venv/bin/python -m benchmarks.steer_cells
"""

from __future__ import annotations

import asyncio
import json
import statistics
from typing import Any

from benchmarks.common import table, write_results
from service.core.sampling import SamplingParams, SteerSpec
from service.serving.facade import GenerationService
from service.serving.registry import load_registry
from service.settings import Settings

SAMPLES, CHARS = 32, 400
STATE = {"h": 0, "c": 1}


def top_unit(cells: dict[str, Any], feature: str) -> dict[str, Any]:
    """The feature's strongest unit that rises with it (AUC above 0.5, or a positive correlation)."""
    found = next(f for f in cells["features"] if f["name"] == feature)
    middle = 0.5 if found["metric"] == "auc" else 0.0
    return dict(next(u for u in found["top"] if u["score"] > middle))


def measure(texts: list[str]) -> tuple[float, float]:
    letters = [c for t in texts for c in t if c.isalpha()]
    capitals = sum(c.isupper() for c in letters) / len(letters)
    lines = [len(line) for t in texts for line in t.split("\n")[1:-1]]  # whole lines only
    return capitals, statistics.mean(lines) if lines else float("nan")


async def main() -> None:
    settings = Settings()
    registry = load_registry(settings)
    service = GenerationService.create(registry, settings)
    service.start()
    cells = json.loads((settings.models_dir / registry.get(None).id / "cells.json").read_text())
    capitals = top_unit(cells, "upper_run")
    line = top_unit(cells, "line_position")
    settings_rows: list[tuple[str, dict[str, Any] | None, float | None]] = [("none", None, None)]
    settings_rows += [("capitals", capitals, v) for v in (-5.0, 5.0)]
    settings_rows += [("line position", line, v) for v in (-5.0, 5.0)]
    rows, results, samples = [], [], {}
    try:
        for name, unit, value in settings_rows:
            steer: tuple[SteerSpec, ...] = ()
            if unit is not None and value is not None:
                steer = (SteerSpec(int(unit["layer"]), STATE[str(unit["state"])], int(unit["unit"]), value=value),)
            params = SamplingParams(max_new_chars=CHARS, steer=steer)
            generations = [await service.generate(params, "\n", seed=s) for s in range(SAMPLES)]
            texts = [r.text for r in await asyncio.gather(*(g.result() for g in generations))]
            caps, length = measure(texts)
            label = (
                "no steering" if unit is None else f"{name}: L{unit['layer']} {unit['state']}{unit['unit']} = {value}"
            )
            rows.append([label, caps, length])
            results.append({"setting": label, "capital_rate": caps, "mean_line_length": length})
            samples[label] = texts[0][:240]
    finally:
        await service.stop()
    print(table(["setting", "capitals / letters", "mean line length"], rows))
    for label, text in samples.items():
        print(f"\n--- {label}\n{text}")
    path = write_results("steer_cells", {"samples": SAMPLES, "chars": CHARS, "results": results, "texts": samples})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    asyncio.run(main())

"""1,000 samples under each of 20 constraints from the bundled model, and under 6 JSON and number
constraints from a small model trained here on JSON lines (another corpus, whose vocabulary has
braces, quotes and digits), each checked independently of llguidance (Python's `re`, `json` and
`jsonschema`, set membership, a counter): how many completed, and how many matched.

    .venv/bin/python -m benchmarks.constraint_table [--samples 1000] [--no-json-model]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import time
from pathlib import Path

from benchmarks.common import table, write_results
from benchmarks.constraint_cases import JSON_CASES, SHAKESPEARE_CASES, Case, balanced, choice, json_lines, regex
from service.core.sampling import ConstraintSpec, SamplingParams
from service.serving.facade import GenerationService
from service.serving.registry import load_registry
from service.settings import Settings

CASES: list[Case] = [
    *SHAKESPEARE_CASES,
    regex(r"[A-Z][a-z]{2,8}: [a-z]{1,10}\."),
    regex(r"(O|Ah|Alas), [a-z]{3,9}[!?]"),
    regex(r"[A-Z][A-Z ]{2,14}:"),
    regex(r"3{1,3}[a-c]{2}"),
    choice(["Thou art", "Thou wert", "Thee"]),
    (
        ConstraintSpec("grammar", 'start: word (", " word){0,3} "."\nword: /[a-z]{2,7}/'),
        lambda t: re.fullmatch(r"[a-z]{2,7}(, [a-z]{2,7}){0,3}\.", t) is not None,
    ),
]

JSON_MODEL_CASES: list[Case] = [
    *JSON_CASES,
    (
        ConstraintSpec("grammar", 'start: "(" item* ")"\nitem: "a" | "[" item* "]" | "(" item* ")"'),
        lambda t: balanced(t) and set(t) <= set("()[]a"),
    ),
]


def train_json_model(folder: Path) -> Path:
    """A small LSTM (2 x 128) trained for a few hundred steps on JSON lines, exported; its models folder."""
    from training.config import TrainConfig
    from training.export import export_many
    from training.train import train

    corpus = folder / "json.txt"
    corpus.write_text(json_lines(5000), encoding="utf-8")
    config = TrainConfig(
        data=[str(corpus)],
        out=str(folder / "run"),
        num_layers=2,
        hidden_size=128,
        embedding_size=32,
        seq_len=64,
        batch_size=32,
        lr=3e-3,
        max_steps=400,
        eval_interval=400,
        progress=False,
        seed=7,
    )
    train(config)
    export_many([str(folder / "run" / "best.pt")], str(folder / "models"), "fp32", names=["json-lstm"])
    return folder / "models"


async def run_table(
    settings: Settings, cases: list[Case], samples: int
) -> tuple[str, list[dict[str, object]], list[list[object]], int]:
    service = GenerationService.create(load_registry(settings), settings)
    service.start()
    rows: list[list[object]] = []
    results: list[dict[str, object]] = []
    total = 0
    try:
        model = service.registry.get(None).id
        for spec, check in cases:
            generations = [
                await service.generate(
                    SamplingParams(temperature=(1.0, 0.7, 1.5, 0.0)[i % 4], max_new_chars=300, constraint=spec),
                    "\n",
                    seed=i,
                )
                for i in range(samples)
            ]
            done = await asyncio.gather(*(g.result() for g in generations))
            stopped = [r.text for r in done if r.completed.finish_reason == "stop"]
            matched = sum(check(t) for t in stopped)
            total += matched
            rows.append([model, f"{spec.kind}: {spec.source[:40]!r}", samples, len(stopped), matched])
            results.append(
                {"kind": spec.kind, "source": spec.source, "samples": samples, "stop": len(stopped), "matched": matched}
            )
    finally:
        await service.stop()
    return model, results, rows, total


async def main(samples: int, json_model: bool) -> None:
    t0 = time.perf_counter()
    model, results, rows, total = await run_table(Settings(), CASES, samples)
    tables = {model: results}
    count = samples * len(CASES)
    if json_model:
        with tempfile.TemporaryDirectory() as folder:
            models = train_json_model(Path(folder))
            other, more, more_rows, more_total = await run_table(Settings(models_dir=models), JSON_MODEL_CASES, samples)
        tables[other] = more
        rows += more_rows
        total += more_total
        count += samples * len(JSON_MODEL_CASES)
    print(table(["model", "constraint", "samples", "finish stop", "matched"], rows))
    print(f"\n{total} of {count} samples matched ({time.perf_counter() - t0:.0f} s)")
    print(f"wrote {write_results('constraint_table', {'samples': samples, 'models': tables})}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--no-json-model", action="store_true", help="only the bundled model")
    args = parser.parse_args()
    asyncio.run(main(args.samples, not args.no_json_model))

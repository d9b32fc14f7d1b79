"""1,000 samples under each of 20 constraints from the bundled model, and under 6 JSON and number
constraints from a small model trained here on JSON lines (another corpus, whose vocabulary has
braces, quotes and digits), each checked independently of llguidance (Python's `re`, `json` and
`jsonschema`, set membership, a counter): how many completed, and how many matched.

    .venv/bin/python -m benchmarks.constraint_table [--samples 1000] [--no-json-model]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jsonschema

from benchmarks.common import table, write_results
from service.core.sampling import ConstraintSpec, SamplingParams
from service.serving.registry import load_registry
from service.serving.service import GenerationService
from service.settings import Settings


def regex(pattern: str, python: str | None = None) -> tuple[ConstraintSpec, Callable[[str], bool]]:
    return ConstraintSpec("regex", pattern), lambda t: re.fullmatch(python or pattern, t) is not None


def choice(options: list[str]) -> tuple[ConstraintSpec, Callable[[str], bool]]:
    return ConstraintSpec("choice", json.dumps(options)), lambda t: t in options


def nested(t: str) -> bool:
    m = re.fullmatch(r"(a*)c(b*)", t)
    return m is not None and len(m.group(1)) == len(m.group(2))


CASES: list[tuple[ConstraintSpec, Callable[[str], bool]]] = [
    regex(r"[A-Z][a-z]{2,6}"),
    regex(r"(ROMEO|JULIET|KING)"),
    regex(r"[a-z]{1,10} [a-z]{1,10}\."),
    regex(r"(Thou|thee|thy) [a-z]{1,8}!"),
    regex(r"[A-Z]{2,4}:\n[A-Z][a-z ,]{5,30}[.?!]"),
    regex(r"(ab|a)(c|bc)?d"),
    regex(r"[aeiou]{3}"),
    regex(r"((to|be), ){1,3}or not"),
    regex(r"[^a-zA-Z\n]{1,5}"),
    regex(r"\w{4} \w{4}", r"[A-Za-z0-9_]{4} [A-Za-z0-9_]{4}"),
    regex(r"[A-Z][a-z]{2,8}: [a-z]{1,10}\."),
    regex(r"(O|Ah|Alas), [a-z]{3,9}[!?]"),
    regex(r"[A-Z][A-Z ]{2,14}:"),
    regex(r"3{1,3}[a-c]{2}"),
    choice(["ROMEO", "JULIET", "KING HENRY VI", "a"]),
    choice(["yes", "no", "yesterday"]),
    choice(["Thou art", "Thou wert", "Thee"]),
    (ConstraintSpec("grammar", 'start: "a" start "b" | "c"'), nested),
    (
        ConstraintSpec("grammar", 'start: name ": " line\nname: /[A-Z]{3,8}/\nline: /[a-z ]{1,20}/ "."'),
        lambda t: re.fullmatch(r"[A-Z]{3,8}: [a-z ]{1,20}\.", t) is not None,
    ),
    (
        ConstraintSpec("grammar", 'start: word (", " word){0,3} "."\nword: /[a-z]{2,7}/'),
        lambda t: re.fullmatch(r"[a-z]{2,7}(, [a-z]{2,7}){0,3}\.", t) is not None,
    ),
]


NESTED = {
    "type": "object",
    "properties": {
        "size": {"enum": ["S", "M", "L"]},
        "inner": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50}, "ok": {"type": "boolean"}},
            "required": ["x", "ok"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3},
    },
    "required": ["size", "inner", "tags"],
    "additionalProperties": False,
}
ID_ONLY = {
    "type": "object",
    "properties": {"id": {"type": "integer"}},
    "required": ["id"],
    "additionalProperties": False,
}


def valid(schema: dict[str, object]) -> Callable[[str], bool]:
    def check(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True

    return check


JSON_CASES: list[tuple[ConstraintSpec, Callable[[str], bool]]] = [
    (ConstraintSpec("json", json.dumps(NESTED)), valid(NESTED)),
    (ConstraintSpec("json", json.dumps(ID_ONLY)), valid(ID_ONLY)),
    (
        ConstraintSpec("json", json.dumps({"enum": ["red", "green", 3, None]})),
        valid({"enum": ["red", "green", 3, None]}),
    ),
    regex(r"[0-9]{5}"),
    regex(r"-?(0|[1-9][0-9]{0,3})\.[0-9]{2}"),
    (
        ConstraintSpec("grammar", 'start: "(" item* ")"\nitem: "a" | "[" item* "]" | "(" item* ")"'),
        lambda t: _brackets(t),
    ),
]


def _brackets(text: str) -> bool:
    stack: list[str] = []
    for c in text:
        if c in "([":
            stack.append(c)
        elif c in ")]" and (not stack or stack.pop() != {")": "(", "]": "["}[c]):
            return False
    return not stack and set(text) <= set("()[]a")


def json_lines(n: int) -> str:
    """JSON lines with nested objects, lists, enums and numbers (the corpus of the tests' JSON model)."""
    rng = random.Random(0)
    words = ["red", "green", "blue", "alpha", "beta", "gamma", "x", "yz", "name", "id", "tags", "ok"]
    lines = []
    for _ in range(n):
        obj = {
            "name": rng.choice(words) + rng.choice(words),
            "id": rng.randint(0, 99999),
            "size": rng.choice(["S", "M", "L"]),
            "tags": [rng.choice(words) for _ in range(rng.randint(0, 3))],
            "ok": rng.choice([True, False, None]),
            "inner": {"x": rng.randint(-50, 50), "y": round(rng.random() * 10, 2)},
        }
        depth = rng.randint(0, 2)
        lines.append(json.dumps(obj) + " (" + "[" * depth + "a" + "]" * depth + ")")
    return "\n".join(lines) + "\n"


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
        layers=2,
        hidden=128,
        embedding=32,
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
    settings: Settings, cases: list[tuple[ConstraintSpec, Callable[[str], bool]]], samples: int
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
            other, more, more_rows, more_total = await run_table(Settings(models_dir=models), JSON_CASES, samples)
        tables[other] = more
        rows += more_rows
        total += more_total
        count += samples * len(JSON_CASES)
    print(table(["model", "constraint", "samples", "finish stop", "matched"], rows))
    print(f"\n{total} of {count} samples matched ({time.perf_counter() - t0:.0f} s)")
    print(f"wrote {write_results('constraint_table', {'samples': samples, 'models': tables})}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--no-json-model", action="store_true", help="only the bundled model")
    args = parser.parse_args()
    asyncio.run(main(args.samples, not args.no_json_model))

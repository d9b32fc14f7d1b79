"""1,000 samples under each of 20 constraints from the bundled model, each checked independently of
llguidance (Python's `re`, set membership, a counter): how many completed, and how many matched.

    .venv/bin/python -m benchmarks.constraint_table [--samples 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Callable

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


async def main(samples: int) -> None:
    settings = Settings()
    service = GenerationService.create(load_registry(settings), settings)
    service.start()
    rows: list[list[object]] = []
    results: list[dict[str, object]] = []
    total = 0
    t0 = time.perf_counter()
    try:
        for spec, check in CASES:
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
            rows.append([f"{spec.kind}: {spec.source[:40]!r}", samples, len(stopped), matched])
            results.append(
                {"kind": spec.kind, "source": spec.source, "samples": samples, "stop": len(stopped), "matched": matched}
            )
    finally:
        await service.stop()
    print(table(["constraint", "samples", "finish stop", "matched"], rows))
    print(f"\n{total} of {samples * len(CASES)} samples matched ({time.perf_counter() - t0:.0f} s)")
    print(f"wrote {write_results('constraint_table', {'model': 'bundled', 'results': results})}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    asyncio.run(main(parser.parse_args().samples))

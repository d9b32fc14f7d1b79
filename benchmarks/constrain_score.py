"""Structured outputs and scoring on the bundled model, through the generation service in-process (no HTTP).

1. 64 streams under a regex vs 64 unconstrained streams, alternated: aggregate characters per second.
2. llguidance's cost: compile time and the time of one character's mask, per kind of constraint.
3. Scoring: 10,000 texts of 100 characters through GenerationService.score (ten requests of 1,000 at
   once), against the raw rate of batched seq=T onnxruntime calls over the same texts.

    .venv/bin/python -m benchmarks.constrain_score [--streams 64] [--chars 200] [--texts 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import numpy as np

from benchmarks.common import table, write_results
from service.core.constraints import ConstraintCompiler
from service.core.sampling import ConstraintSpec, SamplingParams
from service.serving.facade import GenerationService
from service.serving.registry import load_registry
from service.settings import Settings

WORDS = r"([A-Z][a-z]{0,12}|[a-z]{1,12})([ ,;:'.!?\n]{1,2}([A-Z][a-z]{0,12}|[a-z]{1,12})){0,400}"
LINES = r"([A-Z][A-Za-z ]{2,20}:\n([A-Z][a-z ,';]{5,60}[.!?]\n){1,4}\n){1,20}"
KINDS = {
    "regex (words)": ConstraintSpec("regex", WORDS),
    "regex (speeches)": ConstraintSpec("regex", LINES),
    "choice (3)": ConstraintSpec("choice", json.dumps(["ROMEO", "JULIET", "KING HENRY"])),
    "grammar (nesting)": ConstraintSpec("grammar", 'start: "a" start "b" | "c"'),
    "json (object)": ConstraintSpec("json", json.dumps({"type": "object"})),
}


async def streams(service: GenerationService, n: int, chars: int, spec: ConstraintSpec | None) -> tuple[int, float]:
    params = SamplingParams(max_new_chars=chars, constraint=spec)
    t0 = time.perf_counter()
    generations = [await service.generate(params, "\n", seed=i) for i in range(n)]
    results = await asyncio.gather(*(g.result() for g in generations))
    return sum(len(r.text) for r in results), time.perf_counter() - t0


def llguidance_costs(vocab: tuple[str, ...]) -> list[list[object]]:
    rows: list[list[object]] = []
    for name, spec in KINDS.items():
        compiler = ConstraintCompiler(vocab)
        t0 = time.perf_counter()
        try:
            matcher = compiler.matcher(spec)
        except Exception as exc:  # the bundled vocabulary has no braces or quotes: JSON is refused
            rows.append([name, (time.perf_counter() - t0) * 1000, "-", f"refused: {str(exc)[:50]}"])
            continue
        compile_ms = (time.perf_counter() - t0) * 1000
        rng = np.random.default_rng(0)
        took = []
        for _ in range(200):
            allowed = np.flatnonzero(matcher.allowed)
            if not allowed.size:
                break
            matcher.consume(int(rng.choice(allowed)))
            t0 = time.perf_counter()
            matcher.refresh()
            took.append((time.perf_counter() - t0) * 1e6)
        rows.append([name, compile_ms, statistics.median(took), "compiled"])
    return rows


def raw_rate(service: GenerationService, texts: list[str]) -> float:
    """Characters per second of batched seq=T onnxruntime calls over `texts` (each after a line break)."""
    engine = service.registry.get(None).engine
    index = engine.info.vocab_index
    tokens = np.array([[index["\n"]] + [index[c] for c in t] for t in texts], np.int64)
    batch = 256  # the scheduler's max_batch_size
    engine.run(tokens[:batch], engine.zero_state(len(tokens[:batch])))  # warm
    t0 = time.perf_counter()
    for start in range(0, len(tokens), batch):
        engine.run(tokens[start : start + batch], engine.zero_state(len(tokens[start : start + batch])))
    return sum(len(t) for t in texts) / (time.perf_counter() - t0)


async def score_rates(service: GenerationService, texts: list[str]) -> tuple[float, float]:
    """(characters per second through score, the raw batched seq=T rate): the raw rate is measured on
    half the texts before the scoring and on the other half after (the machine is shared: its load
    drifts), and averaged."""
    half = len(texts) // 2
    before = raw_rate(service, texts[:half])
    t0 = time.perf_counter()
    await asyncio.gather(*(service.score(texts[i : i + 1000]) for i in range(0, len(texts), 1000)))
    scored = sum(len(t) for t in texts) / (time.perf_counter() - t0)
    after = raw_rate(service, texts[half:])
    return scored, (before + after) / 2


async def main(args: argparse.Namespace) -> None:
    settings = Settings()
    service = GenerationService.create(load_registry(settings), settings)
    service.start()
    try:
        spec = KINDS["regex (words)"]
        await streams(service, args.streams, 20, spec)  # warm: compiled once, cached after
        rates: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
        for _ in range(args.rounds):
            for name, s in (("unconstrained", None), ("constrained", spec)):
                chars, took = await streams(service, args.streams, args.chars, s)
                rates[name].append(chars / took)
        free, bound = statistics.median(rates["unconstrained"]), statistics.median(rates["constrained"])
        print(f"{args.streams} streams x {args.chars} characters, bundled model, median of {args.rounds} rounds")
        print(table(["streams", "chars/s"], [["unconstrained", free], ["regex-constrained", bound]]))
        print(f"constrained / unconstrained: {bound / free:.3f}\n")

        vocab = service.registry.get(None).engine.info.vocab
        costs = llguidance_costs(vocab)
        print(table(["constraint", "compile ms", "mask us (median)", "outcome"], costs))

        corpus = (settings.models_dir.parent / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
        rng = np.random.default_rng(0)
        starts = rng.integers(0, len(corpus) - 100, args.texts)
        texts = [corpus[s : s + 100] for s in starts]
        scored, raw = await score_rates(service, texts)
        print()
        print(table(["scoring", "chars/s"], [["GenerationService.score", scored], ["raw seq=T onnxruntime", raw]]))
        print(f"score / raw: {scored / raw:.3f}")
        path = write_results(
            "constrain_score",
            {
                "streams": args.streams,
                "chars": args.chars,
                "unconstrained_chars_per_s": rates["unconstrained"],
                "constrained_chars_per_s": rates["constrained"],
                "constrained_ratio": bound / free,
                "llguidance": [
                    dict(zip(["constraint", "compile_ms", "mask_us", "outcome"], r, strict=True)) for r in costs
                ],
                "score_texts": args.texts,
                "score_chars_per_s": scored,
                "raw_seq_t_chars_per_s": raw,
                "score_ratio": scored / raw,
            },
        )
        print(f"\nwrote {path}")
    finally:
        await service.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--chars", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--texts", type=int, default=10_000)
    asyncio.run(main(parser.parse_args()))

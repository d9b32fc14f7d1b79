"""Batch generation against the raw step rate of the same graph, measured in one run.

For each variant of the bundled model: the step loop alone at batch 256 (one-character steps on
pre-bound buffers, no sampling: the ceiling) and `charstream generate` (sampling, nll, stop
matching, --unique, JSONL) at the same batch, in interleaved rounds (median). Wall-clock rates
are what a user sees; CPU-time rates (this process's CPU seconds) are kept beside them because
other work on a shared machine slows the wall clock of either side. Target: generate >= 0.8 of
the ceiling.

    python -m benchmarks.generate [--variants int8,fp32] [--rounds 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import table, write_results
from exports import contract
from service.batch.config import GenerateConfig
from service.batch.run import generate
from service.core import Engine

MODEL = Path(__file__).resolve().parents[1] / "exports" / "shakespeare-lstm"
BATCH = 256


def step_rate(engine: Engine, seconds: float) -> tuple[float, float]:
    """Characters per second (wall, CPU) of the one-character step at BATCH, nothing else."""
    binding = engine.binding(BATCH)
    binding.tokens[:] = np.random.default_rng(0).integers(0, engine.info.vocab_size, (BATCH, 1))
    for _ in range(5):
        binding.run()
    steps, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        binding.run()
        binding.carry()
        steps += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return steps * BATCH / wall, steps * BATCH / cpu


def generate_rate(variant: str, samples: int, folder: Path, round_: int) -> tuple[float, float, int]:
    """Characters per second (wall, CPU) of a whole `charstream generate` job, and its sample count."""
    config = GenerateConfig(
        model=MODEL,
        n=samples,
        variant=variant,
        until="\n",
        unique=True,
        temperature=0.9,
        seed=round_,
        batch=BATCH,
        out=folder / f"{variant}-{round_}.jsonl",
    )
    summary = generate(config)  # both rates over the step loop alone: loading the model is not counted
    return summary.chars_per_s, summary.chars / summary.cpu_seconds, summary.samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="int8,fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="rough length of each measurement")
    args = parser.parse_args()
    rows: list[list[Any]] = []
    results: dict[str, Any] = {"batch": BATCH, "threads": 1, "rounds": args.rounds, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            engine = Engine(MODEL / contract.VARIANT_FILES[variant], threads=1)
            ceiling_wall, _ = step_rate(engine, 1.0)  # warm-up, and the size of a generate job
            samples = max(BATCH, int(ceiling_wall * args.seconds / 45))  # ~45 characters per line
            raw: list[tuple[float, float]] = []
            gen: list[tuple[float, float, int]] = []
            for r in range(args.rounds):
                raw.append(step_rate(engine, args.seconds))
                gen.append(generate_rate(variant, samples, Path(tmp), r))
            raw_wall = statistics.median(x[0] for x in raw)
            raw_cpu = statistics.median(x[1] for x in raw)
            gen_wall = statistics.median(x[0] for x in gen)
            gen_cpu = statistics.median(x[1] for x in gen)
            results["variants"][variant] = {
                "samples_per_job": samples,
                "step_chars_per_s": [x[0] for x in raw],
                "step_chars_per_cpu_s": [x[1] for x in raw],
                "generate_chars_per_s": [x[0] for x in gen],
                "generate_chars_per_cpu_s": [x[1] for x in gen],
                "ratio_wall": gen_wall / raw_wall,
                "ratio_cpu": gen_cpu / raw_cpu,
            }
            rows.append([variant, raw_wall, gen_wall, gen_wall / raw_wall, raw_cpu, gen_cpu, gen_cpu / raw_cpu])
    print(
        table(
            ["variant", "step chars/s", "generate chars/s", "ratio", "step /cpu-s", "generate /cpu-s", "ratio (cpu)"],
            rows,
        )
    )
    print(f"-> {write_results('generate', results)}")


if __name__ == "__main__":
    main()

"""The export targets, measured side by side in one run on one model:

- onnxruntime single step at batch 1 vs PyTorch eager (default CPU backend, and mkldnn off);
- int8 vs fp32: file size, step time, validation loss (from the manifest);
- priming a 1,000-character prompt with one seq=1000 call vs 1,000 single-step calls.

All timings use one thread (torch.set_num_threads(1), onnxruntime intra_op_num_threads=1), the
setting of one server worker or an edge device; medians of repeated runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.common import table, write_results
from exports import contract
from training.checkpoint import load_model

REPO = Path(__file__).resolve().parents[1]


def median_us(fn: Callable[[], object], runs: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def step_candidates(
    fp32: ort.InferenceSession, int8: ort.InferenceSession, manifest: dict[str, Any], checkpoint: Path
) -> dict[str, Callable[[], object]]:
    """One batch-1 step of each candidate: onnxruntime fp32 and int8, and torch eager where the checkpoint is."""
    feed = dict(zip(input_names(manifest), [np.zeros((1, 1), np.int64), *zero_state(manifest)], strict=True))
    candidates: dict[str, Callable[[], object]] = {
        "onnxruntime fp32 step, batch 1": lambda: fp32.run(None, feed),
        "onnxruntime int8 step, batch 1": lambda: int8.run(None, feed),
    }
    if checkpoint.exists():
        model, _, _ = load_model(checkpoint)
        tok = torch.zeros((1, 1), dtype=torch.long)
        st = model.init_state(1)

        def torch_step() -> None:
            with torch.no_grad():
                model(tok, st)

        def torch_step_no_mkldnn() -> None:
            with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
                model(tok, st)

        candidates["torch eager step (default), batch 1"] = torch_step
        candidates["torch eager step (mkldnn off), batch 1"] = torch_step_no_mkldnn
    return candidates


def input_names(manifest: dict[str, Any]) -> list[str]:
    return ["tokens", "h", "c"][: 1 + n_states(manifest)]


def n_states(manifest: dict[str, Any]) -> int:
    return 2 if manifest["cell"] == "lstm" else 1


def zero_state(manifest: dict[str, Any]) -> list[np.ndarray]:
    shape = (manifest["num_layers"], 1, manifest["hidden_size"])
    return [np.zeros(shape, np.float32) for _ in range(n_states(manifest))]


def interleaved(candidates: dict[str, Callable[[], object]], runs: int, rounds: int) -> dict[str, float]:
    """Each candidate's median of its round medians, in microseconds.

    Candidates are timed in interleaved rounds, so machine noise (this step is memory-bound:
    every weight is read per character) hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            times[name].append(median_us(fn, runs // rounds, warmup=10))
    return {name: statistics.median(v) for name, v in times.items()}


def prime_us(fp32: ort.InferenceSession, manifest: dict[str, Any]) -> tuple[float, float]:
    """Microseconds to prime a 1,000-character prompt: one seq=1000 call, and 1,000 seq=1 calls."""
    names = input_names(manifest)
    prompt = np.random.default_rng(0).integers(0, manifest["vocab_size"], (1, 1000)).astype(np.int64)
    state0 = zero_state(manifest)

    def prime_once() -> None:
        fp32.run(None, dict(zip(names, [prompt, *state0], strict=True)))

    def prime_stepwise() -> None:
        st = state0
        for t in range(1000):
            out = fp32.run(None, dict(zip(names, [prompt[:, t : t + 1], *st], strict=True)))
            st = out[1:]

    return median_us(prime_once, 30, warmup=3), median_us(prime_stepwise, 5, warmup=1)


def print_ratios(ratios: dict[str, Any]) -> None:
    print(
        table(
            ["ratio", "value", "target"],
            [
                ["onnxruntime step vs torch eager (default)", ratios["ort_vs_torch_default"], ">= 5x"],
                ["onnxruntime step vs torch eager (mkldnn off)", ratios["ort_vs_torch_mkldnn_off"], ">= 5x"],
                ["onnxruntime int8 step vs torch eager (mkldnn off)", ratios["ort_int8_vs_torch_mkldnn_off"], ""],
                ["int8 smaller than fp32", ratios["int8_smaller"], ">= 3x"],
                ["int8 step faster than fp32", ratios["int8_faster"], ">= 1.5x"],
                ["int8 val loss change (nats/char)", ratios["int8_val_loss_change"], "<= +0.02"],
                ["prime: one call vs 1,000 steps", ratios["prime_one_call_faster"], ">= 2x"],
            ],
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(REPO / "exports" / "shakespeare-lstm"))
    parser.add_argument("--checkpoint", default=str(REPO / "runs" / "shakespeare-lstm" / "best.pt"))
    parser.add_argument("--runs", type=int, default=2000, help="timed calls per candidate, over all rounds")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    folder = Path(args.model)
    manifest = json.loads((folder / contract.MANIFEST_NAME).read_text())
    torch.set_num_threads(1)

    fp32 = session(folder / "model.onnx")
    candidates = step_candidates(fp32, session(folder / "model.int8.onnx"), manifest, Path(args.checkpoint))
    timed = interleaved(candidates, args.runs, args.rounds)
    rows: list[dict[str, object]] = [{"what": k, "us": v} for k, v in timed.items()]
    ort_fp32, ort_int8 = timed["onnxruntime fp32 step, batch 1"], timed["onnxruntime int8 step, batch 1"]
    torch_default = timed.get("torch eager step (default), batch 1", float("nan"))
    torch_no_mkldnn = timed.get("torch eager step (mkldnn off), batch 1", float("nan"))
    prime_one, prime_steps = prime_us(fp32, manifest)
    rows.append({"what": "prime 1,000 chars: one seq=1000 call", "us": prime_one})
    rows.append({"what": "prime 1,000 chars: 1,000 seq=1 calls", "us": prime_steps})

    v32, v8 = manifest["variants"]["fp32"], manifest["variants"].get("int8", {})
    ratios = {
        "ort_vs_torch_default": torch_default / ort_fp32,
        "ort_vs_torch_mkldnn_off": torch_no_mkldnn / ort_fp32,
        "ort_int8_vs_torch_mkldnn_off": torch_no_mkldnn / ort_int8,
        "int8_smaller": v32["bytes"] / v8["bytes"] if v8 else float("nan"),
        "int8_faster": ort_fp32 / ort_int8,
        "int8_val_loss_change": v8.get("val_loss_change"),
        "prime_one_call_faster": prime_steps / prime_one,
    }
    print(f"model {folder.name}: {manifest['cell']} {manifest['num_layers']}x{manifest['hidden_size']}, one thread")
    print(table(["measurement", "microseconds"], [[r["what"], r["us"]] for r in rows]))
    print()
    print_ratios(ratios)
    path = write_results("export_speed", {"model": folder.name, "rows": rows, "ratios": ratios})
    print(f"results: {path}")


if __name__ == "__main__":
    main()

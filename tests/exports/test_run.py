"""The numpy + onnxruntime reference runner, end to end as an edge user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exports import run
from tests.utils import CELLS, REPO
from training.checkpoint import load_model


def runner(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exports.run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("file", ["model.onnx", "model.int8.onnx"])
def test_runner_prints_prime_and_continuation(models_dir: Path, file: str) -> None:
    result = runner(str(models_dir / "tiny-lstm" / file), "--prime", "ROMEO:", "--length", "80", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:") and len(result.stdout.rstrip("\n")) >= 80
    again = runner(str(models_dir / "tiny-lstm" / file), "--prime", "ROMEO:", "--length", "80", "--seed", "1")
    assert again.stdout == result.stdout


@pytest.mark.parametrize("cell", CELLS)
def test_greedy_runner_matches_torch_greedy(models_dir: Path, checkpoints: dict[str, Path], cell: str) -> None:
    """The runner's stepping with caller-owned state produces exactly torch's greedy text."""
    text = run.generate(str(models_dir / f"tiny-{cell}" / "model.onnx"), "KING:", 60, 0.0, None)
    model, vocab, _ = load_model(checkpoints[cell])
    ids = vocab.encode("KING:")
    out = []
    with torch.no_grad():
        logits, state = model(torch.tensor([ids]))
        for _ in range(60):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            logits, state = model(torch.tensor([[nxt]]), state)
    assert text == vocab.decode(out)


def test_runner_uses_only_numpy_and_onnxruntime() -> None:
    """The runner and the sampler it shares with the service: the two files an edge device copies."""
    folder = Path(run.__file__).parent
    imports = set()
    for name in ("run.py", "sampling.py"):
        lines = (folder / name).read_text().splitlines()
        imports |= {line.split()[1] for line in lines if line.startswith(("import ", "from "))}
    outside = {name.split(".")[0] for name in imports} - {"exports"}
    assert outside <= {"__future__", "argparse", "dataclasses", "json", "sys", "numpy", "onnxruntime"}
    assert {name for name in imports if name.startswith("exports")} == {"exports.sampling"}
    assert np is not None


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["/nonexistent/model.onnx"], "cannot load"),
        (["{models}/tiny-gru/model.onnx", "--prime", "€"], "outside the vocabulary"),
        (["{models}/tiny-gru/manifest.json"], "cannot load"),
    ],
)
def test_runner_bad_inputs(models_dir: Path, args: list[str], fragment: str) -> None:
    result = runner(*[a.replace("{models}", str(models_dir)) for a in args])
    assert result.returncode == 2
    assert fragment in result.stderr and "Traceback" not in result.stderr

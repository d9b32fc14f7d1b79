"""The numpy + onnxruntime reference runner, end to end as an edge user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exports import run
from exports import state as portable
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
    text = run.generate(str(models_dir / f"tiny-{cell}" / "model.onnx"), "KING:", 60, 0.0, None).text
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
    """The runner, the sampler it shares with the service, the state format and the contract: the files
    an edge device copies."""
    folder = Path(run.__file__).parent
    imports = set()
    for name in ("run.py", "sampling.py", "state.py", "contract.py"):
        lines = (folder / name).read_text().splitlines()
        imports |= {line.split()[1] for line in lines if line.startswith(("import ", "from "))}
    outside = {name.split(".")[0] for name in imports} - {"exports"}
    stdlib = {"__future__", "argparse", "base64", "binascii", "collections", "dataclasses", "functools"}
    stdlib |= {"hashlib", "hmac", "json", "pathlib", "struct", "sys", "typing"}
    assert outside <= stdlib | {"numpy", "onnxruntime"}, outside - stdlib
    assert {name for name in imports if name.startswith("exports")} <= {
        "exports",
        "exports.sampling",
        "exports.contract",
    }
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


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_conversation_moves_from_server_to_runner_and_back(
    models_dir: Path, tmp_path: Path, temperature: float
) -> None:
    """server -> edge runner -> server: the state (and the RNG in it) goes along, so the text is the
    server's own continuation, greedy or sampled, character for character."""
    from tests.utils import run_server

    sampling = {"temperature": temperature}
    with run_server(models_dir=models_dir, default_model="tiny-lstm") as server, server.client() as c:
        sid = c.post("/v1/sessions", json={"prompt": "ROMEO:", "seed": 21}).json()["id"]
        (tmp_path / "turn.json").write_text(c.get(f"/v1/sessions/{sid}/state").text)  # the server's JSON
        whole = c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 80, **sampling}).json()["text"]
        edge = runner(
            str(models_dir / "tiny-lstm" / "model.onnx"),
            *("--state-in", str(tmp_path / "turn.json"), "--length", "40", "--temperature", str(temperature)),
            *("--state-out", str(tmp_path / "back.state")),
        )
        assert edge.returncode == 0, edge.stderr
        back = (tmp_path / "back.state").read_bytes()
        made = c.post("/v1/sessions", json={"state": portable.encode_text(back)})
        assert made.status_code == 201, made.text
        rest = c.post(f"/v1/sessions/{made.json()['id']}/generate", json={"max_new_chars": 40, **sampling})
    assert edge.stdout.rstrip("\n") + rest.json()["text"] == whole
    assert portable.decode(back).position == len("ROMEO:") + 40


def test_a_state_of_another_model_is_refused_by_the_runner(models_dir: Path, tmp_path: Path) -> None:
    made = runner(str(models_dir / "tiny-gru" / "model.onnx"), "--length", "5", "--state-out", str(tmp_path / "g"))
    assert made.returncode == 0, made.stderr
    refused = runner(str(models_dir / "tiny-lstm" / "model.onnx"), "--state-in", str(tmp_path / "g"))
    assert refused.returncode == 2 and "other weights" in refused.stderr and "Traceback" not in refused.stderr

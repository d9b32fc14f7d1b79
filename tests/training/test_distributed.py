"""torchrun + DistributedDataParallel: 2 CPU processes (gloo) train as one process on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.utils import REPO, bf16_cell, tiny_train_config
from training.checkpoint import load_checkpoint
from training.train import train

# DDP averages the two halves' gradients where one process sums the whole batch at once: the
# same numbers added in another order. After 20 AdamW steps the weights differ by float32
# rounding only: measured max abs difference 5.4e-7; 1e-4 leaves a wide margin for other
# machines' summation orders.
TOLERANCE = 1e-4
SETTINGS = dict(
    hidden_size=32,
    embedding_size=16,
    seq_len=16,
    batch_size=8,
    lr=1e-2,
    warmup_steps=2,
    lr_decay_steps=20,
    eval_interval=10,
    dropout=0.0,
    seed=3,
    precision="fp32",
)


def _torchrun(out: Path, corpus: Path, max_steps: int, *extra: str) -> subprocess.CompletedProcess[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "charstream_cli",
            "train",
            "--data",
            str(corpus),
            "--out",
            str(out),
            f"--max-steps={max_steps}",
            "--no-progress",
            *flags,
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )


def test_two_processes_match_one_process_on_the_same_batch(tmp_path: Path, corpus_file: Path) -> None:
    """20 steps on 2 processes (10 + --resume 10) == 20 steps on 1 process, within TOLERANCE."""
    train(tiny_train_config(corpus_file, tmp_path / "one", max_steps=20, **SETTINGS))  # type: ignore[arg-type]

    first = _torchrun(tmp_path / "two", corpus_file, 10)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun(tmp_path / "two", corpus_file, 20, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Process 0 alone reports: one plan, one summary.
    assert resumed.stdout.count("trained 20 steps") == 1 and resumed.stdout.count("runs to step 20") == 1

    one = load_checkpoint(tmp_path / "one" / "last.pt")
    two = load_checkpoint(tmp_path / "two" / "last.pt")
    assert one["step"] == two["step"] == 20 and two["world_size"] == 2
    worst = max(float((one["model_state"][k] - two["model_state"][k]).abs().max()) for k in one["model_state"])
    assert worst <= TOLERANCE, f"weights differ by {worst:.3g}"
    # The carried state covers every lane of the whole batch, so a resume on any split can continue it.
    for a, b in zip(one["carried_state"], two["carried_state"], strict=True):
        assert a.shape == b.shape == (2, 8, 32)
        assert torch.allclose(a, b, atol=TOLERANCE)
    assert abs(one["val_loss"] - two["val_loss"]) < 1e-3
    rows = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # steps 10 and 20, written once, by process 0


def test_bf16_under_two_processes(tmp_path: Path, corpus_file: Path) -> None:
    """bf16 autocast under DDP: trains, keeps fp32 weights, and lands where one process does."""
    bf16 = {**SETTINGS, "precision": "bf16", "cell": bf16_cell()}
    train(tiny_train_config(corpus_file, tmp_path / "one", max_steps=20, **bf16))  # type: ignore[arg-type]
    two = _torchrun(tmp_path / "two", corpus_file, 20, "--precision=bf16", f"--cell={bf16['cell']}")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "precision bf16 (bf16 autocast, fp32 weights; as asked)" in two.stdout
    one_ckpt = load_checkpoint(tmp_path / "one" / "last.pt")
    two_ckpt = load_checkpoint(tmp_path / "two" / "last.pt")
    assert two_ckpt["precision"] == "bf16" and two_ckpt["world_size"] == 2
    assert all(t.dtype == torch.float32 for t in two_ckpt["model_state"].values())
    # bf16 rounds each half-batch product on its own, so the runs agree loosely, not to fp32 rounding.
    assert abs(one_ckpt["val_loss"] - two_ckpt["val_loss"]) < 0.05


def test_no_gloo_thread_outlives_the_training(tmp_path: Path, corpus_file: Path) -> None:
    """After train() the process group is gone with its worker threads, so none can abort the exit.

    A gloo worker still alive at interpreter shutdown aborted a process now and then (SIGABRT,
    "terminate called without an active exception"); this checks the cause deterministically.
    """
    script = tmp_path / "train_then_list_threads.py"
    script.write_text(
        "import glob, os\n"
        "from pathlib import Path\n"
        "from tests.utils import tiny_train_config\n"
        "from training.train import train\n"
        f"train(tiny_train_config(Path({str(corpus_file)!r}), Path({str(tmp_path / 'run')!r}), max_steps=4,"
        " eval_interval=2, hidden_size=16, embedding_size=8, seq_len=16, batch_size=8))\n"
        "names = sorted(open(f).read().strip() for f in glob.glob('/proc/self/task/*/comm'))\n"
        f"Path({str(tmp_path)!r}, 'threads-' + os.environ['RANK']).write_text(' '.join(names))\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        threads = (tmp_path / f"threads-{rank}").read_text()
        assert "python" in threads and "gloo" not in threads, threads  # gloo_tcp_loop, pt_gloo_runloop

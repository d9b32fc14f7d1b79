from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.utils import CELLS, REPO, tiny_train_config
from training.checkpoint import load_checkpoint, load_model, save_atomic
from training.errors import UserError
from training.evaluate import evaluate_loss, unigram_entropy
from training.train import train


def test_training_beats_the_unigram_entropy(checkpoints: dict[str, Path], corpus_file: Path) -> None:
    """The session fixture trained each tiny model for 200 steps: it must have learned context."""
    from training.corpus import read_corpus

    corpus = read_corpus([corpus_file])
    _, val = corpus.split(0.1)
    for cell, path in checkpoints.items():
        model, vocab, ckpt = load_model(path)
        ids = torch.tensor(vocab.encode(val))
        unigram = unigram_entropy(ids, len(vocab))
        loss = evaluate_loss(model, ids)
        assert loss == pytest.approx(ckpt["val_loss"], abs=1e-4)
        assert loss < unigram - 0.3, f"{cell}: val loss {loss:.3f} vs unigram entropy {unigram:.3f}"
        run = path.parent
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 200 and "val_loss" in rows[-1] and rows[-1]["chars_per_s"] > 0
        assert (run / "last.pt").exists() and (run / "loss.png").stat().st_size > 1000


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model_state"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("cell", CELLS)
def test_resume_is_exact(tmp_path: Path, corpus_file: Path, cell: str) -> None:
    """N steps straight == N/2 steps, then --resume to N (model, optimizer, schedule, RNG, carried state)."""
    common = dict(
        cell=cell, max_steps=40, lr_decay_steps=40, eval_interval=20, dropout=0.2, weight_drop=0.2, warmup_steps=5
    )
    # 26 windows per epoch at these sizes, so the run crosses an epoch boundary after the resume point.
    train(tiny_train_config(corpus_file, tmp_path / "straight", **common, batch_size=128))
    half = dict(common, max_steps=20)
    train(tiny_train_config(corpus_file, tmp_path / "resumed", **half, batch_size=128))
    train(tiny_train_config(corpus_file, tmp_path / "resumed", **common, batch_size=128, resume=True))

    straight, resumed = (
        _weights(tmp_path / "straight" / "last.pt"),
        _weights(tmp_path / "resumed" / "last.pt"),
    )
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["step"] == b["step"] == 40 and a["epoch"] == b["epoch"] >= 1
    assert a["best_val_loss"] == b["best_val_loss"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "metrics log repeats or loses steps across a resume"


def test_resume_rejects_a_different_model(tmp_path: Path, corpus_file: Path) -> None:
    train(tiny_train_config(corpus_file, tmp_path, max_steps=10, eval_interval=10))
    with pytest.raises(UserError, match="cannot resume"):
        train(tiny_train_config(corpus_file, tmp_path, max_steps=20, hidden_size=64, resume=True))
    with pytest.raises(UserError, match="already at step 10"):
        train(tiny_train_config(corpus_file, tmp_path, max_steps=10, resume=True))


def test_resume_of_a_run_saved_under_the_earlier_setting_names(tmp_path: Path, corpus_file: Path) -> None:
    """A last.pt whose training config still says layers/hidden/embedding resumes: only model_config is read."""
    train(tiny_train_config(corpus_file, tmp_path, max_steps=10, eval_interval=10))
    last = tmp_path / "last.pt"
    ckpt = load_checkpoint(last)
    config = ckpt["train_config"]
    earlier = {"num_layers": "layers", "hidden_size": "hidden", "embedding_size": "embedding"}
    ckpt["train_config"] = {earlier.get(k, k): v for k, v in config.items()}
    save_atomic(ckpt, last)
    train(tiny_train_config(corpus_file, tmp_path, max_steps=20, eval_interval=10, resume=True))
    resumed = load_checkpoint(last)
    assert resumed["step"] == 20
    assert {"num_layers", "hidden_size", "embedding_size"} <= resumed["train_config"].keys()


def test_resume_without_checkpoint(tmp_path: Path, corpus_file: Path) -> None:
    with pytest.raises(UserError, match=r"resume asked for, but .* does not exist"):
        train(tiny_train_config(corpus_file, tmp_path, resume=True))


def test_save_is_atomic_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_atomic({"format": "x", "v": 1}, path)
    before = path.read_bytes()

    def broken_save(obj: object, f: object) -> None:
        f.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"format": "x", "v": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_a_kill_during_checkpointing_never_leaves_a_corrupt_file(tmp_path: Path) -> None:
    """SIGKILL a process that rewrites a checkpoint in a loop: the file always loads."""
    script = textwrap.dedent(
        f"""
        import torch, sys
        sys.path.insert(0, {str(REPO)!r})
        from training.checkpoint import save_atomic
        from pathlib import Path
        i = 0
        while True:
            save_atomic({{"i": i, "w": torch.randn(256, 256)}}, Path({str(tmp_path / "ck.pt")!r}))
            i += 1
            print(i, flush=True)
        """
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for _ in range(5):
            proc.stdout.readline()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    loaded = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert loaded["i"] >= 4 and loaded["w"].shape == (256, 256)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "corrupt or not a checkpoint"), (b"garbage" * 100, "corrupt or not a checkpoint")],
)
def test_corrupt_checkpoint(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


def test_foreign_checkpoint(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a charstream checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": -0.1}, "lr must be positive"),
        ({"num_layers": 0}, "num_layers must be at least 1"),
        ({"max_steps": 0}, "max_steps must be at least 1"),
        ({"schedule": "linear"}, "schedule must be one of"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
        ({"seq_len": 200_000}, "shorter than one training window"),
        ({"batch_size": 10_000}, "too short for batch_size 10000"),
        ({"cell": "rnn", "forget_bias": 1.0}, "forget_bias needs a gated cell"),
        ({"precision": "fp8"}, "precision must be one of auto, fp32, bf16, fp16"),
        ({"precision": "fp16", "device": "cpu"}, "precision fp16 needs a CUDA device"),
    ],
)
def test_nonsense_training_settings(
    tmp_path: Path, corpus_file: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(UserError, match=message):
        train(tiny_train_config(corpus_file, tmp_path, **overrides))


def test_resume_removes_stray_checkpoint_temp_files(tmp_path: Path, corpus_file: Path) -> None:
    """A kill while a checkpoint is written leaves save_atomic's temp file; --resume clears it and goes on."""
    train(tiny_train_config(corpus_file, tmp_path, max_steps=10, eval_interval=10))
    last = tmp_path / "last.pt"
    # What a SIGKILL in the middle of save_atomic leaves: half a checkpoint under the temp name.
    stray = [tmp_path / ".last.pt.k1ll3d.tmp", tmp_path / ".best.pt.x7q2ab.tmp"]
    for path in stray:
        path.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    train(tiny_train_config(corpus_file, tmp_path, max_steps=20, eval_interval=10, resume=True))
    assert not any(p.exists() for p in stray)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert load_checkpoint(last)["step"] == 20


def test_max_minutes_alone_trains_for_the_whole_budget(
    tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-minutes alone is the run's length (not one epoch), and the learning rate decays over it."""
    budget_min = 0.05
    cfg = tiny_train_config(
        corpus_file, tmp_path, max_steps=None, max_minutes=budget_min, eval_interval=1000, min_lr_ratio=0.1
    )
    result = train(cfg)
    said = capsys.readouterr().out
    assert "runs for 0.05 min" in said and "the learning rate decays over the time" in said
    ckpt = load_checkpoint(tmp_path / "last.pt")
    # It stopped because the time was spent, the final validation and checkpoint included: the
    # closing line says how the budget went, and that validation read the sample, not the whole split.
    closing = next(line for line in said.splitlines() if line.startswith("time: "))
    total = float(closing.split(" s of the ")[0].removeprefix("time: ").replace(",", ""))
    assert "of the 3 s budget" in closing and "1 validations" in closing and total >= 0.9 * budget_min * 60
    assert ckpt["train_seconds"] <= total
    assert ckpt["step"] == result.step
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lr"] < 0.2 * cfg.lr  # the schedule reached (nearly) its floor at the end of the time


def test_the_start_says_how_far_a_run_goes(
    tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train(tiny_train_config(corpus_file, tmp_path, max_steps=30, max_minutes=5, eval_interval=30))
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("training lstm 2x48 (") and "steps of 32 x 32 chars per epoch" in said[0]
    assert said[1].strip().startswith("runs to step 30 (") and "or for 5 min, whichever comes first" in said[1]

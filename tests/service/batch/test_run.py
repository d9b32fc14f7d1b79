"""`service.batch.run` on the tiny trained model: deterministic, unique, novel, resumable, sharded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from service.batch.config import GenerateConfig
from service.batch.novelty import FOLDER
from service.batch.run import BatchError, generate
from tests.utils import REPO

pytestmark = pytest.mark.slow


def samples(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def texts(path: Path) -> list[str]:
    return [str(s["text"]) for s in samples(path)]


@pytest.fixture
def config(models_dir: Path, tmp_path: Path) -> GenerateConfig:
    return GenerateConfig(
        model=models_dir / "tiny-lstm", n=300, until="\n", max_chars=60, seed=5, batch=32, out=tmp_path / "a.jsonl"
    )


def test_same_command_same_samples_and_any_batch_size(config: GenerateConfig, tmp_path: Path) -> None:
    first = generate(config)
    assert first.samples == 300 and first.chars > 0
    again = generate(replace(config, out=tmp_path / "b.jsonl"))
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert again.chars == first.chars
    # Each attempt has its own RNG: the rows it shared its steps with do not change its text.
    generate(replace(config, out=tmp_path / "c.jsonl", batch=7))
    assert texts(tmp_path / "c.jsonl") == texts(tmp_path / "a.jsonl")
    generate(replace(config, out=tmp_path / "d.jsonl", seed=6))
    assert texts(tmp_path / "d.jsonl") != texts(tmp_path / "a.jsonl")
    rows = samples(tmp_path / "a.jsonl")
    assert [r["sample"] for r in rows] == list(range(300))
    assert all("\n" not in str(r["text"]) for r in rows)
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    assert all(float(r["nll"]) > 0 for r in rows)  # type: ignore[arg-type]
    assert all(len(str(r["text"])) == 60 for r in rows if r["finish_reason"] == "length")


def test_unique_rejects_every_repeat(config: GenerateConfig, tmp_path: Path) -> None:
    # Two characters at a low temperature: repeats are certain, so --unique has work to do.
    short = replace(config, until=None, max_chars=2, temperature=0.5, n=40)
    plain = generate(short)
    assert plain.unique < plain.samples  # the same command without --unique repeats itself
    unique = generate(replace(short, unique=True, out=tmp_path / "u.jsonl"))
    found = texts(tmp_path / "u.jsonl")
    assert len(found) == len(set(found)) == unique.samples == unique.unique == 40
    assert unique.duplicates > 0 and unique.attempts == 40 + unique.duplicates
    # The first occurrences, in attempt order: the plain run's texts with repeats dropped.
    plain_order = list(dict.fromkeys(texts(tmp_path / "a.jsonl")))
    assert found[: len(plain_order)] == plain_order[: len(found)]


def test_novel_rejects_corpus_samples_and_keeps_its_index(config: GenerateConfig, tmp_path: Path) -> None:
    generate(config)
    made = texts(tmp_path / "a.jsonl")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(made[:100]) + "\n", encoding="utf-8")
    novel = generate(replace(config, novel=corpus, out=tmp_path / "n.jsonl", n=100))
    found = texts(tmp_path / "n.jsonl")
    assert not set(found) & set(made[:100])
    assert found == [t for t in made if t not in set(made[:100])][:100]
    assert novel.in_corpus >= 100 and novel.novel == 100
    index_files = list((config.model / FOLDER).glob("*.npy"))
    assert len(index_files) == 1 and str(index_files[0]) in novel.index
    stamp = index_files[0].stat().st_mtime_ns
    generate(replace(config, novel=corpus, out=tmp_path / "n2.jsonl", n=100))
    assert texts(tmp_path / "n2.jsonl") == found
    assert index_files[0].stat().st_mtime_ns == stamp  # read back, not built again


def test_shards_split_the_attempts_with_disjoint_seeds(config: GenerateConfig, tmp_path: Path) -> None:
    generate(config)
    whole = {int(str(r["sample"])): r["text"] for r in samples(tmp_path / "a.jsonl")}
    parts: dict[int, object] = {}
    for i in range(3):
        out = tmp_path / f"shard{i}.jsonl"
        summary = generate(replace(config, shard=(i, 3), out=out))
        assert summary.samples == 100
        got = {int(str(r["sample"])): r["text"] for r in samples(out)}
        assert all(k % 3 == i for k in got)
        assert not got.keys() & parts.keys()
        parts.update(got)
    assert parts == whole


def test_resume_after_a_kill_loses_nothing_and_repeats_nothing(models_dir: Path, tmp_path: Path) -> None:
    args = ["generate", str(models_dir / "tiny-lstm"), "--n", "4000", "--until", "\n", "--unique", "--seed", "9"]
    args += ["--batch", "64", "--max-chars", "80", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole.jsonl"
    done = subprocess.run([sys.executable, "-m", "charstream_cli", *args, "--out", str(whole)], env=env, timeout=300)
    assert done.returncode == 0

    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "charstream_cli", *args, "--out", str(killed)], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not killed.exists() or killed.read_text().count("\n") < 500):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = killed.read_text().count("\n")
    assert 500 <= written < 4000, "the kill came too late to test a resume"
    with killed.open("a") as f:
        f.write('{"text": "half a li')  # a line cut short by the kill
    again = subprocess.run(
        [sys.executable, "-m", "charstream_cli", *args, "--out", str(killed), "--resume"],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr
    assert f"({written:,} from before)" in again.stderr
    assert killed.read_text() == whole.read_text()


def test_resume_refuses_other_settings_and_fresh_runs_refuse_old_files(config: GenerateConfig) -> None:
    generate(replace(config, n=10))
    with pytest.raises(BatchError, match="--resume to continue"):
        generate(config)
    with pytest.raises(BatchError, match="temperature"):
        generate(replace(config, temperature=0.5, resume=True))
    more = generate(replace(config, resume=True))  # same settings, larger n: continues
    assert more.resumed == 10 and more.samples == 300


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"n": 0}, "--n"),
        ({"top_p": 1.5}, "--top-p"),
        ({"top_k": 10_000}, "--top-k"),
        ({"prompt": "\u2603"}, "--prompt"),
        ({"until": "\u2603"}, "--until"),
        ({"shard": (3, 3)}, "--shard"),
        ({"variant": "fp16"}, "MODEL"),
        ({"novel": Path("/nonexistent")}, "--novel"),
        ({"resume": True, "out": None}, "--resume needs --out"),
    ],
)
def test_bad_settings_name_their_flag(config: GenerateConfig, change: dict[str, object], fragment: str) -> None:
    with pytest.raises(BatchError, match=fragment):
        generate(replace(config, **change))  # type: ignore[arg-type]


def test_min_p_of_one_keeps_only_the_likeliest_character(config: GenerateConfig, tmp_path: Path) -> None:
    generate(replace(config, n=20, temperature=0.0))
    greedy = texts(tmp_path / "a.jsonl")
    generate(replace(config, n=20, min_p=1.0, out=tmp_path / "m.jsonl"))
    assert texts(tmp_path / "m.jsonl") == greedy and len(set(greedy)) == 1
    generate(replace(config, n=20, min_p=0.05, out=tmp_path / "s.jsonl"))
    assert len(set(texts(tmp_path / "s.jsonl"))) > 1
    with pytest.raises(BatchError, match="--min-p"):
        generate(replace(config, min_p=1.5))


def test_structured_outputs_every_sample_matches(config: GenerateConfig, tmp_path: Path) -> None:
    import re

    pattern = "[A-Z][a-z]{2,6}( [A-Z][a-z]{2,6})?"
    summary = generate(replace(config, n=60, until=None, constraint=("regex", pattern), unique=True))
    rows = samples(tmp_path / "a.jsonl")
    assert len(rows) == 60 == summary.samples and all(re.fullmatch(pattern, str(r["text"])) for r in rows)
    assert {r["finish_reason"] for r in rows} == {"stop"}
    choices = ["ROMEO", "JULIET", "KING"]
    generate(
        replace(
            config, n=3, until=None, constraint=("choice", json.dumps(choices)), unique=True, out=tmp_path / "c.jsonl"
        )
    )
    assert sorted(texts(tmp_path / "c.jsonl")) == sorted(choices)
    with pytest.raises(BatchError, match="--regex cannot be used"):
        generate(replace(config, constraint=("regex", "\u2603+"), out=tmp_path / "x.jsonl"))

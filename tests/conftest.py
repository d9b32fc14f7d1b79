from __future__ import annotations

from pathlib import Path

import pytest

from tests.parts import REQUIRE_ALL_PARTS
from tests.utils import CELLS, SHAKESPEARE, tiny_train_config


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        REQUIRE_ALL_PARTS,
        action="store_true",
        help="a missing real part (Chromium, a container engine, onnxruntime-web) fails its tests;"
        " any skip fails the run",
    )


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under --require-all-parts a run that skipped anything is not a pass: a skip hides a failure."""
    if session.config.getoption(REQUIRE_ALL_PARTS) and _skipped and exitstatus == pytest.ExitCode.OK:
        print(f"\n{len(_skipped)} skipped under {REQUIRE_ALL_PARTS}, which fails the run: {', '.join(_skipped[:5])}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models gain nothing from intra-op threads, and OpenMP threads that spin-wait make a
    # busy 2-core machine crawl; one thread keeps the suite's time steady.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 120k characters of tiny-shakespeare: big enough to learn from in seconds."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare-small.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:120_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> dict[str, Path]:
    """A real tiny LSTM, GRU and vanilla RNN, trained by the project's own loop."""
    from training.train import train

    out = {}
    for cell in CELLS:
        folder = tmp_path_factory.mktemp(f"run-{cell}")
        train(tiny_train_config(corpus_file, folder, cell=cell))
        out[cell] = folder / "best.pt"
    return out


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path], corpus_file: Path) -> Path:
    """The tiny models exported (fp32 + int8) as the service reads them: tiny-lstm, tiny-gru, tiny-rnn."""
    from training.export import export_many

    out = tmp_path_factory.mktemp("models")
    export_many(
        [str(checkpoints[cell]) for cell in CELLS],
        str(out),
        "fp32,int8",
        names=[f"tiny-{cell}" for cell in CELLS],
        data=[str(corpus_file)],
    )
    return out

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
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
    # What runs cache between them (the precision auto measured) goes to a folder of the test run's
    # own, for this process and every process it starts, never to the user's cache.
    import os
    import tempfile

    os.environ["CHARSTREAM_CACHE_DIR"] = tempfile.mkdtemp(prefix="charstream-cache-")
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


# How long a test's processes and threads may take to end after it, before it counts as a leak.
LEFT_RUNNING_GRACE_S = 20.0


@pytest.fixture(autouse=True)
def nothing_left_running() -> Iterator[None]:
    """Every process, scheduler thread and non-daemon thread a test starts has ended when it ends (checked for each
    test, so the check holds alone, shuffled or module by module). Those of longer-lived fixtures
    (a module's server, the session's Redis) were there before the test and are not counted, nor
    what they start meanwhile (Chromium's helpers for the session's browser)."""
    me = psutil.Process()
    children = {p.pid for p in me.children(recursive=True)}
    threads = set(threading.enumerate())
    yield
    deadline = time.monotonic() + LEFT_RUNNING_GRACE_S
    while True:
        processes = [p for p in me.children(recursive=True) if _started_by_the_test(p, children) and _alive(p)]
        lingering = [t for t in threading.enumerate() if t not in threads and t.is_alive() and not _pooled(t)]
        if not (processes or lingering) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not processes, f"left running: {[_command(p) for p in processes]}"
    assert not lingering, f"threads left running: {[t.name for t in lingering]}"


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()[:4])
    except psutil.Error:
        return f"pid {process.pid} (ended)"


def _pooled(thread: threading.Thread) -> bool:
    """A daemon thread, or a worker of an executor: a long-lived fixture's event loop (Playwright's)
    starts its default executor's workers when it first needs one, which may be during any test; an
    event loop a test runs itself (asyncio.run) joins its workers before it returns."""
    if thread.name.startswith("step-"):  # a scheduler's: the server that ran it must have stopped it
        return False
    return thread.daemon or thread.name.startswith(("asyncio_", "ThreadPoolExecutor-"))


def _started_by_the_test(process: psutil.Process, before: set[int]) -> bool:
    """A process that was not there before the test and descends from none that was."""
    if process.pid in before:
        return False
    try:
        return not any(parent.pid in before for parent in process.parents())
    except psutil.Error:
        return False

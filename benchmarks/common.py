"""Shared bits of the benchmark scripts: a results folder, a table printer, machine facts, the CPU
time of processes, and the real servers they measure (`ServerProcess`, `start_charstream`)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from exports.contract import VARIANT_FILES

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# The bundled model, served and stepped unless a benchmark is told otherwise.
MODELS_DIR = REPO / "exports"
MODEL = "shakespeare-lstm"
VARIANT = "fp32"
# `python -m service`, as the container runs it: one uvicorn process, or a supervisor of workers.
SERVE = (sys.executable, "-m", "service")


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write at the benchmarks' one resolution, and free a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def median_of_runs(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each key's median over the rounds of one measurement."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def model_file(variant: str = VARIANT, model: str = MODEL, models_dir: Path = MODELS_DIR) -> Path:
    """The graph file of one variant of an exported model (by default the bundled one's fp32)."""
    return models_dir / model / VARIANT_FILES[variant]


def own_cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads: the benchmark's clients."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- real servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A real server in a subprocess on loopback: started, polled until `ready_path` answers 200,
    stopped. Its CPU time, RSS and open files are those of the process and every process it started
    (a supervisor and its workers).

    `own_group` starts it in a process group of its own, so that stop() and paused() reach every
    process it starts; `log` takes its output (else it shares this terminal's). As a context manager
    it is stopped when the block ends."""

    def __init__(
        self,
        command: Sequence[str],
        port: int,
        *,
        name: str = "charstream",
        ready_path: str = "/readyz",
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO,
        log: Path | None = None,
        own_group: bool = False,
        ready_timeout_s: float = 60,
    ) -> None:
        self.name = name
        self.port = port
        self.ready_path = ready_path
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        self.own_group = own_group
        full_env = {**os.environ, **(env or {})}
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(log.open("wb")) if log is not None else None
            self.proc = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                start_new_session=own_group,
            )
        try:
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.ps = psutil.Process(self.proc.pid)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(self.base + self.ready_path, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                output = f":\n{self.log.read_text(errors='replace')}" if self.log is not None else ""
                raise RuntimeError(f"{self.name} did not become ready{output}")
            time.sleep(0.1)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def processes(self) -> list[psutil.Process]:
        """The server's process and every process it started, as they are now."""
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return [self.ps]

    def cpu_seconds(self) -> float:
        """User + system CPU time so far; a process that has ended meanwhile counts nothing."""
        total = 0.0
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss(self) -> int:
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total

    def fds(self) -> int:
        """Open file descriptors: a connection held is one."""
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.num_fds()
        return total

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The whole group stopped (SIGSTOP) while another server is measured, resumed after."""
        if not self.own_group:
            raise RuntimeError(f"{self.name} shares this process group: start it with own_group=True")
        os.killpg(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM (to the whole group where it has its own), SIGKILL after 30 s of waiting."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        if self.own_group:
            with contextlib.suppress(ProcessLookupError):  # workers that outlived their parent
                os.killpg(self.proc.pid, signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        if self.own_group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)


def start_charstream(
    port: int,
    checkout: Path | str = REPO,
    *,
    models_dir: Path | str = MODELS_DIR,
    model: str = MODEL,
    variant: str = VARIANT,
    **env: str,
) -> ServerProcess:
    """`python -m service` from `checkout` (another checkout of this repository compares code versions),
    serving `model` with limits no benchmark reaches; `env` (CHARSTREAM_* settings) comes last."""
    settings = {
        "CHARSTREAM_MODELS_DIR": str(models_dir),
        "CHARSTREAM_DEFAULT_MODEL": model,
        "CHARSTREAM_VARIANT": variant,
        "CHARSTREAM_PORT": str(port),
        "CHARSTREAM_LOG_LEVEL": "warning",
        "CHARSTREAM_MAX_SESSIONS": "20000",
        "CHARSTREAM_MAX_NEW_CHARS": "100000",
        "CHARSTREAM_MAX_PROMPT_CHARS": "100000",
    }
    return ServerProcess(SERVE, port, env=settings | env, cwd=Path(checkout))

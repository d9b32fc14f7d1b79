"""Several server processes on one port: a small supervisor, as gunicorn's arbiter does.

Each worker is an ordinary `charstream serve` process that binds the port with SO_REUSEPORT,
so the kernel spreads new connections over them; sessions live in the shared store (Redis),
so any worker can continue any session. The supervisor forwards SIGTERM and SIGINT (each
worker then drains as one process does), restarts a worker that dies unexpectedly, and exits
when all have stopped.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from service.settings import Settings

log = logging.getLogger("charstream.workers")

RESTART_DELAY_S = 1.0
STOP_MARGIN_S = 15.0  # after the drain's grace period, before a worker that hangs is killed


class Supervisor:
    def __init__(self, settings: Settings, argv: list[str]) -> None:
        self.settings = settings
        self.argv = argv  # the command that runs one worker
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def _spawn(self, index: int) -> None:
        settings = self.settings
        env = os.environ | {
            # The command line's choices travel to the workers as settings.
            "CHARSTREAM_MODELS_DIR": str(settings.models_dir),
            "CHARSTREAM_HOST": settings.host,
            "CHARSTREAM_PORT": str(settings.port),
            "CHARSTREAM_WORKERS": "1",
            "CHARSTREAM_REUSE_PORT": "true",
        }
        self.workers[index] = subprocess.Popen(self.argv, env=env)
        log.info("worker started", extra={"worker": index, "pid": self.workers[index].pid})

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        for index in range(self.settings.workers):
            self._spawn(index)
        while not self.stopping:
            for index, proc in list(self.workers.items()):
                code = proc.poll()
                if code is not None and not self.stopping:
                    log.error("worker exited; restarting it", extra={"worker": index, "code": code})
                    time.sleep(RESTART_DELAY_S)
                    if not self.stopping:
                        self._spawn(index)
            time.sleep(0.2)
        deadline = time.monotonic() + self.settings.shutdown_grace_s + STOP_MARGIN_S
        for proc in self.workers.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.info("all workers stopped")
        return 0


def worker_command() -> list[str]:
    """`python -m service`: one worker, its settings from the same environment."""
    return [sys.executable, "-m", "service"]

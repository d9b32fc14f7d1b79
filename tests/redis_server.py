"""A real redis-server for the tests: installed from Debian's packages when missing, started on a
free loopback port as a child of the test, with no persistence unless asked for (an append-only
file in its folder), and stopped by its own PID."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.debian import apt_install
from tests.utils import free_port


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    apt_install("redis-server")
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("redis-server was installed but is not on PATH")
    return found


class RedisServer:
    """`redis-server` on 127.0.0.1; `stop()` and `start()` again on the same port (a restart)."""

    def __init__(self, folder: Path, port: int | None = None, appendonly: bool = False) -> None:
        self.folder = folder
        self.appendonly = appendonly
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--dir",
                str(self.folder),
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

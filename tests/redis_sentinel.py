"""A real Redis Sentinel group for the tests: a primary, its replicas and three sentinels, each a
`redis-server` child process on a free loopback port, stopped by its own PID.

The sentinels watch the primary as `SERVICE` with a quorum of two and call it down after one
second without an answer (docs/sessions.md measures what a failover costs with these values).
Every server and sentinel needs one password, as the shipped deployments do: the data servers'
`requirepass` and `masterauth` (replicas authenticate to whichever is the primary), the sentinels'
`sentinel auth-pass` (for the data servers) and `requirepass` (for clients and each other)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from tests.redis_server import new_password, redis_server_binary
from tests.utils import free_port

SERVICE = "charstream"
DOWN_AFTER_MS = 1000


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` until it holds; RuntimeError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class SentinelGroup:
    """A primary, `replicas` replicas and three sentinels on 127.0.0.1."""

    def __init__(self, folder: Path, replicas: int = 1) -> None:
        self.folder = folder
        self.ports = [free_port() for _ in range(1 + replicas)]  # the first starts as the primary
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.password = new_password()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://:{self.password}@{hosts}/{SERVICE}/0"

    def _spawn(self, port: int, args: list[str]) -> None:
        self.procs[port] = subprocess.Popen(
            [redis_server_binary(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _server(self, port: int, replica_of: int | None) -> None:
        folder = self.folder / str(port)
        folder.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)]
        args += ["--requirepass", self.password, "--masterauth", self.password]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self._spawn(port, args)

    def start(self, attempts: int = 3) -> SentinelGroup:
        """Start every server and wait until the group is linked. A free port can be taken by another
        process before its server binds it (the machine's clients draw from the same ports): then
        that server exits, and the group starts again on fresh ports."""
        for attempt in range(attempts):
            try:
                return self._start()
            except RuntimeError:
                exited = [port for port, proc in self.procs.items() if proc.poll() is not None]
                self.stop()
                self.procs.clear()
                if not exited or attempt == attempts - 1:
                    raise
                self.ports = [free_port() for _ in self.ports]
                self.sentinel_ports = [free_port() for _ in range(3)]
        raise AssertionError("unreachable")

    def _start(self) -> SentinelGroup:
        primary, *replicas = self.ports
        self._server(primary, None)
        for port in replicas:
            self._server(port, primary)
        for port in self.sentinel_ports:
            conf = self.folder / f"sentinel-{port}.conf"  # sentinels rewrite their own file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.folder}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel auth-pass {SERVICE} {self.password}\n"
                f"requirepass {self.password}\n"
            )
            self._spawn(port, [str(conf), "--sentinel"])
        wait_for(lambda: self._linked(replicas), 30, "the replicas to sync")
        wait_for(lambda: self._seen(primary, len(replicas)), 30, "the sentinels to see every server")
        return self

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, password=self.password)

    def _linked(self, replicas: list[int]) -> bool:
        for port in replicas:
            with self.client(port) as c:
                if c.info("replication").get("master_link_status") != "up":
                    return False
        return True

    def _seen(self, primary: int, replicas: int) -> bool:
        for port in self.sentinel_ports:
            with self.client(port) as c:
                if self.primary_by(c) != primary or len(c.sentinel_slaves(SERVICE)) != replicas:
                    return False
                if int(c.sentinel_master(SERVICE)["num-other-sentinels"]) != 2:
                    return False
        return True

    @staticmethod
    def primary_by(sentinel: redis.Redis) -> int:
        address: Any = sentinel.sentinel_get_master_addr_by_name(SERVICE)  # (host, port)
        return int(address[1])

    def primary(self) -> int:
        """The primary's port, as the first sentinel that answers says."""
        for port in self.sentinel_ports:
            try:
                with self.client(port) as c:
                    return self.primary_by(c)
            except redis.RedisError:
                continue
        raise RuntimeError("no sentinel answers")

    def kill(self, port: int) -> None:
        """SIGKILL one server: no goodbye to its replicas or clients."""
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

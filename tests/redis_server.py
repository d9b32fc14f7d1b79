"""A real redis-server for the tests: installed from Debian's packages when missing, started on a
free loopback port as a child of the test, with a password (as every shipped deployment has), no
persistence unless asked for (an append-only file in its folder), TLS when asked for, and stopped
by its own PID."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

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


def new_password() -> str:
    """A fresh password, URL-safe as the deployment docs ask (hex)."""
    return secrets.token_hex(16)


def self_signed_certificate(folder: Path) -> Path:
    """A certificate for 127.0.0.1 (its own CA) and its key, `cert.pem` and `key.pem` in `folder`."""
    if not shutil.which("openssl"):
        apt_install("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    subprocess.run(
        ["openssl", *request, "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert


class RedisServer:
    """`redis-server` on 127.0.0.1 that needs `password`; `stop()` and `start()` again on the same
    port (a restart). With `tls`, it speaks TLS only, with a self-signed certificate in its folder,
    and `url` is a rediss:// URL that trusts it."""

    def __init__(self, folder: Path, port: int | None = None, appendonly: bool = False, tls: bool = False) -> None:
        self.folder = folder
        self.appendonly = appendonly
        self.port = port or free_port()
        self.password = new_password()
        self.tls = tls
        self.certificate = folder / "tls" / "cert.pem"
        if tls:
            query = f"?ssl_ca_certs={self.certificate}"
            self.url = f"rediss://:{self.password}@127.0.0.1:{self.port}/0{query}"
        else:
            self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def _listen(self) -> list[str]:
        if not self.tls:
            return ["--port", str(self.port)]
        if not self.certificate.exists():
            self_signed_certificate(self.certificate.parent)
        cert, key = str(self.certificate), str(self.certificate.parent / "key.pem")
        files = ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", cert]
        return ["--port", "0", "--tls-port", str(self.port), *files, "--tls-auth-clients", "no"]

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                *self._listen(),
                "--requirepass",
                self.password,
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
        client = self.client(socket_timeout=1)
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

    def client(self, **options: Any) -> redis.Redis:
        """A client with the password (over TLS when the server speaks it)."""
        tls = {"ssl": True, "ssl_ca_certs": str(self.certificate)} if self.tls else {}
        settings: dict[str, Any] = {"socket_timeout": 2, "password": self.password, **tls, **options}
        return redis.Redis(host="127.0.0.1", port=self.port, **settings)

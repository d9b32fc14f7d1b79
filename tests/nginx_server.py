"""A real nginx for the tests: installed from Debian's packages when missing, run with the
deployment's own configuration (deploy/nginx.conf) rendered for loopback ports, as a child of
the test, and stopped by its own PID."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.debian import apt_install
from tests.utils import REPO, free_port

CONFIG = REPO / "deploy" / "nginx.conf"


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found:
        return found
    apt_install("nginx-light")
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(found, os.X_OK):
        raise RuntimeError("nginx was installed but is not on PATH")
    return found


def _replace_once(text: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, lambda _: replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise AssertionError(f"deploy/nginx.conf: expected one line matching {pattern!r}, found {count}")
    return new


def render_config(folder: Path, port: int, upstreams: list[int]) -> str:
    """deploy/nginx.conf with loopback addresses, and its logs, pid and temp files in `folder`."""
    text = CONFIG.read_text()
    # The lines deploy/nginx-start.sh writes in a container, for loopback replicas.
    servers = "".join(f"server 127.0.0.1:{p} max_fails=3 fail_timeout=5s;\n" for p in upstreams)
    (folder / "charstream-upstreams.conf").write_text(servers)
    text = _replace_once(
        text,
        r"^(\s*)include /etc/nginx/charstream-upstreams.conf;$",
        f"        include {folder}/charstream-upstreams.conf;",
    )
    text = _replace_once(text, r"^(\s*)listen 8080;$", f"        listen 127.0.0.1:{port};")
    text = _replace_once(text, r"^pid .*;$", f"pid {folder}/nginx.pid;")
    text = _replace_once(text, r"^error_log .*;$", f"error_log {folder}/error.log warn;")
    text = _replace_once(
        text,
        r"^(\s*)access_log /dev/stdout charstream;$",
        f"    access_log {folder}/access.log charstream;\n"
        f"    client_body_temp_path {folder}/client_body;\n"
        f"    proxy_temp_path {folder}/proxy;",
    )
    if os.geteuid() == 0:  # workers would otherwise run as nobody, who cannot enter the test's folder
        text = "user root;\n" + text
    return text


class NginxServer:
    """nginx on 127.0.0.1 in front of charstream replicas on the given loopback ports."""

    def __init__(self, folder: Path, upstreams: list[int]) -> None:
        self.folder = folder
        self.port = free_port()
        self.upstreams = upstreams
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.access_log = folder / "access.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NginxServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "nginx.conf"
        conf.write_text(render_config(self.folder, self.port, self.upstreams))
        error_log = self.folder / "error.log"
        cmd = [nginx_binary(), "-p", f"{self.folder}/", "-c", str(conf), "-e", str(error_log), "-g", "daemon off;"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{self.base_url}/nginx-health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = error_log.read_text() if error_log.exists() else ""
                self.stop()
                raise RuntimeError(f"nginx did not start:\n{log}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown: the master stops its workers
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def routes(self) -> list[tuple[str, str, str]]:
        """(request line, what routed it: "session" or "request", upstream addresses) for every
        request in the access log, in the order they ended. nginx writes a request's line just after
        its response, so the log is read once it has stopped growing for a moment."""
        size, deadline = -1, time.monotonic() + 5
        while size != self.access_log.stat().st_size and time.monotonic() < deadline:
            size = self.access_log.stat().st_size
            time.sleep(0.1)
        pattern = re.compile(
            r'"(?P<request>[^"]*)" \d+ \d+ routed_by=(?P<routed_by>\w+) upstream="(?P<upstream>[^"]*)"'
        )
        found = (pattern.search(line) for line in self.access_log.read_text().splitlines())
        return [(m["request"], m["routed_by"], m["upstream"]) for m in found if m]

"""Factories shared by the tests: tiny trained models, exported folders, a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
CELLS = ("lstm", "gru", "rnn")  # every cell the project trains, exports and serves


def tiny_train_config(data: Path, out: Path, cell: str = "lstm", **overrides: object):
    from training.config import TrainConfig

    values: dict[str, object] = dict(
        data=[str(data)],
        out=str(out),
        cell=cell,
        num_layers=2,
        hidden_size=48,
        embedding_size=16,
        seq_len=32,
        batch_size=32,
        lr=1.5e-2,
        warmup_steps=10,
        max_steps=200,
        eval_interval=100,
        progress=False,
        seed=7,
        # fp32 everywhere, so a test's numbers do not depend on whether this CPU has native bf16.
        precision="fp32",
    )
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


@dataclass
class Server:
    base_url: str
    ws_url: str
    server: object
    app: object

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30, **kwargs)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def run_server(**settings: object) -> Iterator[Server]:
    """A real uvicorn server on 127.0.0.1 in a thread; always stopped, also when the test fails."""
    import uvicorn

    from service.api.app import create_app
    from service.server import GracefulServer
    from service.settings import load_settings

    port = free_port()
    cfg = load_settings(host="127.0.0.1", port=port, log_json=False, **settings)
    app = create_app(cfg)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", ws="websockets-sansio"
    )
    server = GracefulServer(config, app, cfg.shutdown_grace_s)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield Server(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", server, app)
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        assert not thread.is_alive(), "uvicorn did not stop"


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    base_url: str
    ws_url: str
    log: Path

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30, **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def serve_process(log: Path, port: int | None = None, **env: str) -> Iterator[ServeProcess]:
    """`python -m service` (as the container runs it) on a loopback port (a free one unless given),
    logging to `log`; killed when the block ends if it is still running."""
    port = port or free_port()
    full_env = os.environ | {"CHARSTREAM_HOST": "127.0.0.1", "CHARSTREAM_PORT": str(port)} | env
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], env=full_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"charstream did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield ServeProcess(proc, f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def leased_sessions(server: Server) -> int:
    """Sessions the server's (memory) store holds leased right now."""
    service = server.app.state.service  # type: ignore[attr-defined]
    return int(asyncio.run(service.store.stats()).busy)


def bf16_cell() -> str:
    """A cell this machine trains under bf16 autocast: the LSTM where its kernels exist (oneDNN has
    no bf16 LSTM without AVX-512), else the GRU, whose embedding and head still run in bf16."""
    import torch

    from training.precision import cannot_run

    cpu = torch.device("cpu")
    return next(cell for cell in ("lstm", "gru") if cannot_run("bf16", cpu, cell) is None)

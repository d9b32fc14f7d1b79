"""Container smoke test: build the serving image, run it on 127.0.0.1, generate over HTTP and
WebSocket, check it runs as non-root without torch, bring up the compose file; always clean up."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tomllib
from websockets.sync.client import connect

from tests.browser.parts import ensure_ort_web
from tests.container.engine import (
    REPO,
    Engine,
    EngineUnavailable,
    base_image,
    build_wheelhouse,
    deploy_images,
    find_engine,
)
from tests.parts import part_missing
from tests.utils import free_port

# A fresh machine installs Podman and makes a base image first: minutes, not seconds.
pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]
IMAGE = "localhost/charstream-smoke:test"
TRAIN_IMAGE = "localhost/charstream-smoke-train:test"
# The tag the compose files name: the project's version.
COMPOSE_IMAGE = f"charstream:{tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['version']}"


@pytest.fixture(scope="module")
def engine(pytestconfig: pytest.Config) -> Engine:
    try:
        engine = find_engine()
    except EngineUnavailable as exc:
        part_missing(
            pytestconfig, "a container engine", "apt-get install -y podman runc debootstrap podman-compose", str(exc)
        )
    if not engine.compose:
        part_missing(pytestconfig, f"a compose command for {engine.command}", "apt-get install -y podman-compose")
    return engine


def build(engine: Engine, target: str, tag: str) -> float:
    """Build one stage of the Dockerfile as `tag`; the seconds it took."""
    t0 = time.perf_counter()
    # Podman's default OCI format has no HEALTHCHECK; the docker format keeps it.
    fmt = ["--format", "docker"] if engine.command == "podman" else []
    result = engine.run(
        "build",
        *fmt,
        "--build-arg",
        f"BASE_IMAGE={base_image(engine)}",
        "--target",
        target,
        "-t",
        tag,
        str(REPO),
        check=False,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def image(engine: Engine) -> Iterator[str]:
    build_wheelhouse("serve", "train")  # one wheelhouse for both images, so neither build removes the other's
    ensure_ort_web()  # the playground's onnxruntime-web files travel in the build context
    seconds = build(engine, "serve", IMAGE)
    size = int(engine.run("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip())
    print(f"\nimage built in {seconds:.1f}s; size {size / 1e6:.0f} MB")
    assert size < 400e6, f"image is {size / 1e6:.0f} MB"
    yield IMAGE
    engine.run("rmi", "-f", IMAGE, check=False)


@pytest.fixture(scope="module")
def train_image(engine: Engine, image: str) -> Iterator[str]:
    """The training image (torch's CPU build, the training side, no service)."""
    seconds = build(engine, "train", TRAIN_IMAGE)
    print(f"\ntraining image built in {seconds:.1f}s")
    yield TRAIN_IMAGE
    engine.run("rmi", "-f", TRAIN_IMAGE, check=False)


SERVING_COMMANDS = ("serve", "generate")
TRAINING_COMMANDS = ("train", "sample", "eval", "export", "cells")


@pytest.mark.parametrize("which", ["serve", "train"])
def test_each_image_runs_its_sides_commands_and_refuses_the_others(
    engine: Engine, image: str, train_image: str, which: str
) -> None:
    """`--help` of every sub-command: its own side's answer; the other side's a one-line refusal."""
    tag, own = (image, SERVING_COMMANDS) if which == "serve" else (train_image, TRAINING_COMMANDS)
    entry = [] if which == "train" else ["--entrypoint", "python", tag, "-m", "charstream_cli"]
    for command in (*SERVING_COMMANDS, *TRAINING_COMMANDS):
        # No health check for a one-off command: Podman would log its own complaint on stderr.
        args = ["run", "--rm", "--no-healthcheck", *(entry or [tag]), command, "--help"]
        result = engine.run(*args, check=False, timeout=120)
        if command in own:
            assert result.returncode == 0, result.stderr[-2000:]
            assert result.stdout.startswith(f"usage: charstream {command}"), result.stdout[:200]
        else:
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
            assert lines[0].startswith(f"charstream {command}: error: this install cannot run it"), lines[0]


class Container:
    def __init__(self, engine: Engine, image: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.engine = engine
        self.name = f"charstream-smoke-{secrets.token_hex(4)}"
        self.port = free_port()
        env_args = [x for k, v in (env or {}).items() for x in ("-e", f"{k}={v}")]
        self.started = time.perf_counter()
        engine.run("run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:8000", *env_args, *args, image)
        self.base = f"http://127.0.0.1:{self.port}"

    def wait(self, path: str = "/readyz", status: int = 200, timeout: float = 60) -> tuple[httpx.Response, float]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = httpx.get(self.base + path, timeout=2)
                if r.status_code == status:
                    return r, time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                logs = self.engine.run("logs", self.name, check=False)
                raise AssertionError(f"{path} never answered {status}: {logs.stdout[-2000:]}{logs.stderr[-2000:]}")
            time.sleep(0.1)

    def remove(self) -> None:
        self.engine.run("rm", "-f", self.name, check=False)


@pytest.fixture
def containers(engine: Engine) -> Iterator[list[Container]]:
    started: list[Container] = []
    yield started
    for c in started:
        c.remove()


def test_image_serves_the_bundled_model(engine: Engine, image: str, containers: list[Container]) -> None:
    c = Container(engine, image)
    containers.append(c)
    ready, seconds = c.wait()
    print(f"\ncontainer start to ready: {seconds:.2f}s")
    assert ready.json()["models"] == ["shakespeare-lstm"]
    # Listening on 0.0.0.0, the image made a key on its first start and printed it.
    key = engine.run("exec", c.name, "cat", "/state/api-key").stdout.strip()
    printed = engine.run("logs", c.name)
    assert len(key) >= 32 and key in printed.stdout + printed.stderr
    body = {"prompt": "ROMEO:", "max_new_chars": 50, "seed": 1}
    assert httpx.post(f"{c.base}/v1/generate", json=body, timeout=30).status_code == 401
    r = httpx.post(f"{c.base}/v1/generate", json=body, headers={"X-API-Key": key}, timeout=30)
    assert r.status_code == 200 and len(r.json()["text"]) == 50
    with connect(f"ws://127.0.0.1:{c.port}/v1/stream", subprotocols=["charstream", f"charstream.key.{key}"]) as ws:  # type: ignore[list-item]
        ws.send(json.dumps({"type": "generate", "prompt": "KING:", "max_new_chars": 20}))
        texts, final = [], None
        while final is None:
            m = json.loads(ws.recv(timeout=30))
            if m["type"] == "text":
                texts.append(m["text"])
            elif m["type"] in ("done", "error"):
                final = m
        assert final["type"] == "done" and len("".join(texts)) == 20
    uid = engine.run("exec", c.name, "id", "-u").stdout.strip()
    assert uid != "0"
    no_torch = engine.run("exec", c.name, "python", "-c", "import torch", check=False)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    no_training = engine.run("exec", c.name, "python", "-c", "import training", check=False)
    assert no_training.returncode != 0
    no_gcc = engine.run("exec", c.name, "sh", "-c", "command -v gcc cc", check=False)
    assert no_gcc.stdout.strip() == ""
    health = engine.run("inspect", c.name, "--format", "{{json .Config.Healthcheck}}").stdout
    assert "healthz" in health
    # The playground and the files it runs models with in a browser, from the image alone.
    page = httpx.get(f"{c.base}/", timeout=10)
    assert page.status_code == 200 and 'data-testid="generate"' in page.text
    assert httpx.get(f"{c.base}/playground.json", timeout=10).json()["ort_web"]
    wasm = httpx.get(f"{c.base}/static/ort/ort-wasm-simd-threaded.wasm", timeout=30)
    assert wasm.status_code == 200 and wasm.headers["content-type"] == "application/wasm"
    cells = httpx.get(f"{c.base}/v1/models/shakespeare-lstm/cells", headers={"X-API-Key": key}, timeout=10)
    assert cells.json()["features"]


def test_broken_models_volume_starts_not_ready(
    engine: Engine, image: str, containers: list[Container], tmp_path: Path
) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.onnx").write_bytes(b"not a model")
    os.chmod(tmp_path, 0o755)
    volume = ["-v", f"{tmp_path}:/models:ro"]
    c = Container(engine, image, *volume, env={"CHARSTREAM_MODELS_DIR": "/models"})
    containers.append(c)
    r, _ = c.wait(status=503)
    assert r.json()["status"] == "not_ready" and "broken" in r.json()["failed"]
    assert httpx.get(f"{c.base}/healthz").status_code == 200  # alive, just not ready

    strict = Container(
        engine, image, *volume, env={"CHARSTREAM_MODELS_DIR": "/models", "CHARSTREAM_REQUIRE_MODELS": "1"}
    )
    containers.append(strict)
    code = engine.run("wait", strict.name, timeout=60).stdout.strip()
    assert code not in ("", "0")
    assert "CHARSTREAM_REQUIRE_MODELS" in engine.run("logs", strict.name).stderr


def test_a_wrong_setting_fails_with_one_line(engine: Engine, image: str, containers: list[Container]) -> None:
    c = Container(engine, image, env={"CHARSTREAM_MAX_SESSIONS": "plenty"})
    containers.append(c)
    assert engine.run("wait", c.name, timeout=60).stdout.strip() == "2"
    logs = engine.run("logs", c.name)
    lines = (logs.stdout + logs.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charstream serve: error: CHARSTREAM_MAX_SESSIONS:")


def test_compose_up_serves(engine: Engine, image: str) -> None:
    project = f"charstream-smoke-{secrets.token_hex(3)}"
    port = free_port()
    env = {**os.environ, **engine.env, "CHARSTREAM_PUBLISH_PORT": str(port)}
    # compose uses the image built above rather than building its own copy.
    engine.run("tag", image, COMPOSE_IMAGE)
    cmd = [*engine.compose, "-p", project, "-f", str(REPO / "compose.yaml")]
    try:
        up = subprocess.run([*cmd, "up", "-d", "serve"], capture_output=True, text=True, env=env, timeout=600)
        assert up.returncode == 0, up.stderr[-3000:]
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "compose service never became ready"
            time.sleep(0.2)
        # The first start made a key on the state volume and printed it; /v1 needs it.
        key = api_key(engine, f"{project}_serve_1")
        body = {"prompt": "A", "max_new_chars": 10}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json=body, timeout=30)
        assert r.status_code == 401
        logs = engine.run("logs", f"{project}_serve_1")
        assert key in logs.stdout + logs.stderr  # printed once, for the one who started it
        headers = {"Authorization": f"Bearer {key}"}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json=body, headers=headers, timeout=30)
        assert r.status_code == 200 and len(r.json()["text"]) == 10
    finally:
        subprocess.run([*cmd, "down", "-v"], capture_output=True, env=env, timeout=300)
        engine.run("network", "rm", "-f", f"{project}_default", check=False)  # podman-compose leaves it
        engine.run("rmi", COMPOSE_IMAGE, check=False)


def test_scaled_deployment_survives_a_killed_replica(engine: Engine, image: str) -> None:
    """compose.scale.yaml unchanged: nginx + 2 replicas + Redis; a session continues after its replica is killed."""
    deploy_images(engine)
    project = f"charstream-scale-{secrets.token_hex(3)}"
    port = free_port()
    env = {
        **os.environ,
        **engine.env,
        "CHARSTREAM_PUBLISH_PORT": str(port),
        "CHARSTREAM_REPLICAS": "2",  # what `--scale charstream=2` says to docker compose
        "CHARSTREAM_LEASE_TTL_S": "2",
        "CHARSTREAM_MAX_NEW_CHARS": "1000000",
        "REDIS_PASSWORD": secrets.token_hex(16),  # what .env holds in a real deployment
    }
    engine.run("tag", image, COMPOSE_IMAGE)
    cmd = [*engine.compose, "-p", project, "-f", str(REPO / "compose.scale.yaml")]
    base = f"http://127.0.0.1:{port}"
    try:
        up = subprocess.run([*cmd, "up", "-d"], capture_output=True, text=True, env=env, timeout=600)
        assert up.returncode == 0, up.stderr[-3000:]
        replicas = [f"{project}_charstream_{i}" for i in (1, 2)]
        ready = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"
        deadline = time.monotonic() + 90
        while True:  # both replicas ready (their own /readyz), and nginx passing requests on
            try:
                replicas_ready = all(
                    engine.run("exec", r, "python", "-c", ready, check=False).returncode == 0 for r in replicas
                )
                if replicas_ready and httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the scaled deployment never became ready"
            time.sleep(0.2)
        key = api_key(engine, replicas[0])  # one key, made by the first replica, read by both
        assert api_key(engine, replicas[1]) == key
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as c:
            sid = c.post("/v1/sessions", json={"prompt": "KING:", "seed": 5}).json()["id"]
            c.headers["X-Session-Id"] = sid
            r = c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 30, "temperature": 0})
            assert r.status_code == 200 and len(r.json()["text"]) == 30
            victim = _replica_serving(engine, replicas, engine.run("logs", f"{project}_nginx_1").stdout)
            long = {"max_new_chars": 1_000_000, "stream": True}
            finished = False  # had the stream ended before the kill, its text would have been saved
            with contextlib.suppress(httpx.HTTPError), c.stream("POST", f"/v1/sessions/{sid}/generate", json=long) as s:
                for n, line in enumerate(s.iter_lines()):
                    if n == 10:
                        engine.run("kill", victim)
                    finished = finished or line == "data: [DONE]"
            for _ in range(200):  # as a client should: retry 409, 502 and 503
                r = c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 20, "temperature": 0})
                if r.status_code not in (409, 502, 503):
                    break
                time.sleep(0.25)
            assert r.status_code == 200, r.text
            assert not finished
            assert c.get(f"/v1/sessions/{sid}").json()["history_chars"] == 5 + 30 + 20
        nginx_log = engine.run("logs", f"{project}_nginx_1").stdout
        assert sid not in nginx_log and key not in nginx_log
        for name in ("redis_1", *(r.removeprefix(f"{project}_") for r in replicas)):
            logs = engine.run("logs", f"{project}_{name}")
            assert env["REDIS_PASSWORD"] not in logs.stdout + logs.stderr, name
    finally:
        subprocess.run([*cmd, "down", "-v"], capture_output=True, env=env, timeout=300)
        engine.run("network", "rm", "-f", f"{project}_default", check=False)  # podman-compose leaves it
        engine.run("rmi", COMPOSE_IMAGE, check=False)


def api_key(engine: Engine, container: str) -> str:
    """The key charstream made on the state volume at its first start."""
    return engine.run("exec", container, "cat", "/state/api-key").stdout.strip()


def _replica_serving(engine: Engine, replicas: list[str], nginx_log: str) -> str:
    """The replica nginx last sent a session request to (the access log masks which session: the
    test's requests run one at a time), from the log and the replicas' addresses."""
    tried = re.findall(r'"POST /v1/sessions/-/generate [^"]*" .* routed_by=session upstream="([^"]+)"', nginx_log)
    assert tried, nginx_log[-2000:]
    address = tried[-1].split(", ")[-1].removesuffix(":8000")  # the last one tried answered
    for name in replicas:
        found = engine.run("inspect", name, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
        if found.stdout.strip() == address:
            return name
    raise AssertionError(f"no replica has the address {address}")

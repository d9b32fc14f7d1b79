from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.errors import ServiceConfigError
from service.settings import bundled_models_dir, load_settings
from tests.utils import REPO


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.models_dir == bundled_models_dir() == REPO / "exports"
    assert s.host == "127.0.0.1" and s.batching is True
    monkeypatch.setenv("CHARSTREAM_PORT", "9001")
    monkeypatch.setenv("CHARSTREAM_BATCHING", "false")
    s = load_settings()
    assert s.port == 9001 and s.batching is False


@pytest.mark.parametrize(
    ("var", "value", "fragment"),
    [
        ("CHARSTREAM_PORT", "eighty", "CHARSTREAM_PORT:"),
        (
            "CHARSTREAM_MAX_SESSIONS",
            "0",
            "CHARSTREAM_MAX_SESSIONS: Input should be greater than or equal to 1",
        ),
        ("CHARSTREAM_VARIANT", "int4", "CHARSTREAM_VARIANT:"),
        ("CHARSTREAM_SESSION_TTL_S", "-5", "CHARSTREAM_SESSION_TTL_S:"),
        ("CHARSTREAM_PROMPT_CACHE_BYTES", "-1", "CHARSTREAM_PROMPT_CACHE_BYTES:"),
        ("CHARSTREAM_EVENT_LOOP", "trio", "CHARSTREAM_EVENT_LOOP: Input should be 'asyncio' or 'uvloop'"),
    ],
)
def test_a_wrong_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ServiceConfigError, match=fragment):
        load_settings()


def serve_process(**env: str) -> subprocess.CompletedProcess[str]:
    """`python -m service` as the container runs it, with only the given CHARSTREAM_* settings."""
    return subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env},
    )


def test_serve_with_a_wrong_setting_exits_with_one_line() -> None:
    result = serve_process(CHARSTREAM_MAX_NEW_CHARS="lots")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "charstream serve: error: CHARSTREAM_MAX_NEW_CHARS: Input should be a valid integer, "
        "unable to parse string as an integer (got 'lots')"
    ]


def test_require_models_exits_non_zero_when_a_model_is_broken(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.onnx").write_bytes(b"junk")
    result = serve_process(CHARSTREAM_MODELS_DIR=str(tmp_path), CHARSTREAM_REQUIRE_MODELS="1", CHARSTREAM_PORT="0")
    assert result.returncode != 0
    # The structured log line of the failed load, then the one-line error.
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("charstream serve: error: CHARSTREAM_REQUIRE_MODELS is set and models failed: broken")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_api_key_stops_the_start(value: str) -> None:
    """An empty key would make an empty header a valid credential."""
    result = serve_process(CHARSTREAM_API_KEY=value)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "charstream serve: error: CHARSTREAM_API_KEY: Value error, must not be empty; unset it to serve without a key"
    ]

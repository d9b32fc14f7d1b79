"""The keys file and the keyring: what a key may do, and the one-line errors of a bad file."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from service.api.keys import USER_SCOPES, key_from_file, load_keyring, read_keys_file
from service.errors import ServiceConfigError
from service.settings import load_settings

ALICE = "alice-secret-0123456789"
BOB = "bob-secret-0123456789ab"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def test_keys_from_a_file_with_scopes_quotas_and_digests(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
[keys.alice]
key = "{ALICE}"
scopes = ["generate"]
requests_per_s = 2.5
chars_per_s = 100
max_sessions = 3

[keys.bob]
key_sha256 = "{hashlib.sha256(BOB.encode()).hexdigest()}"
""",
    )
    ring = load_keyring(load_settings(keys_file=path))
    alice, bob = ring.find(ALICE), ring.find(BOB)
    assert alice is not None and alice.name == "alice" and alice.scopes == {"generate"}
    assert (alice.quota.requests_per_s, alice.quota.chars_per_s, alice.quota.max_sessions) == (2.5, 100, 3)
    assert bob is not None and bob.name == "bob" and bob.scopes == USER_SCOPES and bob.quota.requests_per_s is None
    assert ring.find("alice-secret-012345678") is None and ring.find("") is None
    assert all(ALICE not in repr(k) and BOB not in repr(k) for k in ring.keys)  # only digests are kept


def test_the_single_keys_keep_working_beside_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, f'[keys.alice]\nkey = "{ALICE}"\n')
    ring = load_keyring(load_settings(keys_file=path, api_key="user-key", admin_key="admin-key"))
    user, admin = ring.find("user-key"), ring.find("admin-key")
    assert user is not None and user.name == "default" and user.scopes == USER_SCOPES
    assert admin is not None and admin.scopes == {"admin", "metrics"}
    assert not load_keyring(load_settings()).enabled


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not toml [", "is not TOML"),
        ("[other]\nx = 1\n", "needs [keys.NAME] tables"),
        ('[keys.a]\nscopes = ["generate"]\n', "keys.a: give exactly one of key or key_sha256"),
        (f'[keys.a]\nkey = "{ALICE}"\nkey_sha256 = "{"0" * 64}"\n', "keys.a: give exactly one"),
        ('[keys.a]\nkey = "short"\n', "keys.a.key: String should have at least 16 characters"),
        (f'[keys.a]\nkey = "{ALICE}"\nscopes = ["root"]\n', "keys.a.scopes.0: Input should be"),
        (f'[keys.a]\nkey = "{ALICE}"\nrequests_per_s = 0\n', "keys.a.requests_per_s: Input should be greater"),
        (f'[keys.a]\nkey = "{ALICE}"\ncolour = "red"\n', "keys.a.colour: Extra inputs are not permitted"),
        (f'[keys.a]\nkey = "{ALICE}"\n[keys.b]\nkey = "{ALICE}"\n', "two API keys have the same secret"),
        (f'[keys.default]\nkey = "{ALICE}"\n', "the name 'default' is taken by CHARSTREAM_API_KEY"),
    ],
)
def test_a_bad_keys_file_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    settings = load_settings(keys_file=write(tmp_path, text), api_key="user-key")
    with pytest.raises(ServiceConfigError, match=r"^CHARSTREAM_KEYS_FILE: |^two API keys") as err:
        load_keyring(settings)
    assert message in str(err.value) and "\n" not in str(err.value) and ALICE not in str(err.value)


def test_a_missing_keys_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ServiceConfigError, match="CHARSTREAM_KEYS_FILE: cannot read"):
        read_keys_file(tmp_path / "nope.toml")


def test_the_key_file_is_made_once_private_and_read_after(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state" / "api-key"
    with pytest.raises(ServiceConfigError, match="does not exist"):
        key_from_file(path, create=False)
    made = key_from_file(path, create=True)
    assert made in capsys.readouterr().err and len(made) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_from_file(path, create=True) == made and capsys.readouterr().err == ""  # said once only
    ring = load_keyring(load_settings(api_key_file=path))
    assert ring.find(made) is not None and ring.find(made).name == "default"  # type: ignore[union-attr]
    path.write_text("short\n")
    with pytest.raises(ServiceConfigError, match="shorter than 16"):
        key_from_file(path, create=False)

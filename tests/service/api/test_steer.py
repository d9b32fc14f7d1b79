"""Steering by cells on a real server: a clamped unit reads its value after every step, an offset moves
the text, and `add: 0` is exactly no steering (text, logprobs and unit values bit for bit)."""

from __future__ import annotations

from typing import Any

from tests.utils import Server

BASE: dict[str, Any] = {
    "prompt": "ROMEO:",
    "seed": 11,
    "max_new_chars": 80,
    "logprobs": True,
    "activations": {"layer": 1, "state": "c", "units": [3, 7]},
}


def test_add_zero_is_no_steering(server: Server) -> None:
    with server.client() as c:
        plain = c.post("/v1/generate", json=BASE).json()
        zero = c.post("/v1/generate", json=BASE | {"steer": [{"layer": 1, "state": "c", "unit": 3, "add": 0}]}).json()
        assert zero == plain


def test_a_clamped_unit_holds_its_value_and_changes_the_text(server: Server) -> None:
    with server.client() as c:
        plain = c.post("/v1/generate", json=BASE).json()
        steer = [{"layer": 1, "state": "c", "unit": 3, "value": 5.0}]
        clamped = c.post("/v1/generate", json=BASE | {"steer": steer}).json()
        # The unit values are read after each step's write: the clamp shows on every character.
        assert [a[0] for a in clamped["activations"]] == [5.0] * 80
        assert [a[0] for a in plain["activations"]] != [5.0] * 80
        offset = [{"layer": 0, "state": "h", "unit": u, "add": 0.9} for u in range(16)]
        moved = c.post("/v1/generate", json=BASE | {"steer": offset}).json()
        assert moved["text"] != plain["text"]


def test_steering_a_session(server: Server) -> None:
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"seed": 2}).json()["id"]
        steer = [{"layer": 0, "unit": 1, "value": -1.0}]
        r = c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 20, "steer": steer})
        assert r.status_code == 200 and len(r.json()["text"]) == 20
        assert c.get(f"/v1/sessions/{sid}").json()["history_chars"] == 21  # the line break it started from

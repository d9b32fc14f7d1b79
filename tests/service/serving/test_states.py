"""Portable states against real servers: a session exported and imported continues character for
character (across a restart, and between replicas with memory stores), a conversation held in
return_state tokens with no server session equals one held in a session, and every state that does
not fit is 409 state_refused saying why (another model, other weights, wrong shapes, non-finite
values, a cut or padded blob, a bad signature)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from exports import state as portable
from tests.utils import Server, run_server

MODEL = "tiny-lstm"
TURNS = [("ROMEO:", 60), ("\nJULIET:", 40), ("\nROMEO: ", 50)]
SAMPLING = {"temperature": 0.8, "top_k": 20}
STATE_KEY = "a-state-signing-key-0123"


@pytest.fixture(scope="module")
def server(models_dir: Path) -> Iterator[Server]:
    with run_server(models_dir=models_dir, default_model=MODEL) as s:
        yield s


def exported(c: httpx.Client, sid: str) -> str:
    r = c.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["format"] == "charstream-state" and info["version"] == 1
    return str(info["state"])


def continued(c: httpx.Client, sid: str, chars: int = 80) -> str:
    r = c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": chars, **SAMPLING})
    assert r.status_code == 200, r.text
    return str(r.json()["text"])


def test_an_imported_state_continues_exactly_on_another_server(models_dir: Path, server: Server) -> None:
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"prompt": "ROMEO:", "seed": 11}).json()["id"]
        continued(c, sid, 30)  # the RNG has moved on: the state must carry where it is
        state = exported(c, sid)
        raw = c.get(f"/v1/sessions/{sid}/state", headers={"accept": "application/octet-stream"})
        assert raw.headers["content-type"] == "application/octet-stream"
        assert raw.content == portable.decode_text(state)
        header = portable.decode(raw.content)
        assert header.position == len("ROMEO:") + 30 and header.last_char is not None
        original = continued(c, sid)
    # A fresh server (a restart; a replica with its own memory store) picks the conversation up.
    with run_server(models_dir=models_dir, default_model=MODEL) as other, other.client() as c:
        made = c.post("/v1/sessions", json={"state": state})
        assert made.status_code == 201, made.text
        assert made.json()["history_chars"] == header.position
        assert continued(c, made.json()["id"]) == original
        # No session at all: the state itself is the conversation.
        r = c.post("/v1/generate", json={"state": state, "max_new_chars": 80, **SAMPLING})
        assert r.status_code == 200 and r.json()["text"] == original and r.json()["session_id"] is None


def test_return_state_holds_a_conversation_with_no_session(server: Server) -> None:
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"seed": 4}).json()["id"]
        in_session = [
            c.post(f"/v1/sessions/{sid}/generate", json={"prompt": p, "max_new_chars": n, **SAMPLING}).json()["text"]
            for p, n in TURNS
        ]
        tokens, state = [], None
        for i, (prompt, n) in enumerate(TURNS):
            body: dict[str, Any] = {"prompt": prompt, "max_new_chars": n, "return_state": True, **SAMPLING}
            body |= {"state": state} if state is not None else {"seed": 4}
            r = c.post("/v1/generate", json=body, headers={} if i % 2 else {"x-turn": str(i)})
            assert r.status_code == 200, r.text
            tokens.append(r.json()["text"])
            state = r.json()["state"]
        assert tokens == in_session
        assert state == exported(c, sid)  # the same state, byte for byte
        # Streamed, the final frame carries it.
        with c.stream(
            "POST", "/v1/generate", json={"state": state, "max_new_chars": 5, "return_state": True, "stream": True}
        ) as s:
            frames = [
                json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:") and "[DONE]" not in line
            ]
        assert "finish_reason" in frames[-1] and portable.decode_text(frames[-1]["state"])


def test_the_websocket_starts_from_a_state_and_returns_one(server: Server) -> None:
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"prompt": "ROMEO:", "seed": 2}).json()["id"]
        state = exported(c, sid)
        expected = continued(c, sid, 20)
    with connect(f"{server.ws_url}/v1/stream") as ws:
        ws.send(json.dumps({"type": "generate", "state": state, "max_new_chars": 20, "return_state": True, **SAMPLING}))
        messages = []
        while not messages or messages[-1]["type"] not in ("done", "error"):
            messages.append(json.loads(ws.recv(timeout=30)))
    assert messages[0]["type"] == "session"
    assert "".join(m["text"] for m in messages if m["type"] == "text") == expected
    with server.client() as c:
        assert messages[-1]["state"] == exported(c, messages[0]["id"])


def forged(c: httpx.Client, sid: str, **changes: Any) -> str:
    state = portable.decode(portable.decode_text(exported(c, sid)))
    for name, value in changes.items():
        setattr(state, name, value)
    return portable.encode_text(portable.encode(state))


def test_a_state_that_does_not_fit_is_refused(server: Server) -> None:
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"prompt": "ROMEO:"}).json()["id"]
        good = portable.decode_text(exported(c, sid))
        gru = c.post("/v1/sessions", json={"model": "tiny-gru", "prompt": "ROMEO:"}).json()["id"]
        state = portable.decode(good)
        cases = {
            "belongs to model 'tiny-gru', not 'tiny-lstm'": (exported(c, gru), MODEL),
            "other weights": (forged(c, sid, weights_sha256="0" * 64), None),
            "which this server does not serve": (forged(c, sid, model="elsewhere"), None),
            "2 x 2 x 48": (forged(c, sid, tensors=[t[:1] for t in state.tensors]), None),
            "not finite": (forged(c, sid, tensors=[np.full_like(t, np.nan) for t in state.tensors]), None),
            "truncated": (portable.encode_text(good[:-9]), None),
            "over-long": (portable.encode_text(good + b"\0\0\0\0"), None),
            "not a PCG64 state": (forged(c, sid, rng={"bit_generator": "MT19937"}), None),
        }
        for says, (text, model) in cases.items():
            for path, body in (
                ("/v1/sessions", {"state": text}),
                ("/v1/generate", {"state": text, "max_new_chars": 3}),
            ):
                r = c.post(path, json=body | ({"model": model} if model else {}))
                assert r.status_code == 409, (says, r.text)
                assert r.json()["error"]["code"] == "state_refused" and says in r.json()["error"]["message"], r.text
        both = c.post("/v1/generate", json={"state": portable.encode_text(good), "session_id": sid})
        assert both.status_code == 422 and both.json()["error"]["field"] == "state"


def test_with_a_state_key_only_states_signed_under_it_are_taken(models_dir: Path, server: Server) -> None:
    with server.client() as c:
        unsigned = exported(c, c.post("/v1/sessions", json={"prompt": "ROMEO:"}).json()["id"])
    with run_server(models_dir=models_dir, default_model=MODEL, state_key=STATE_KEY) as signing, signing.client() as c:
        sid = c.post("/v1/sessions", json={"prompt": "ROMEO:"}).json()["id"]
        signed = exported(c, sid)
        assert portable.decode(portable.decode_text(signed), STATE_KEY.encode()).position == len("ROMEO:")
        assert c.post("/v1/sessions", json={"state": signed}).status_code == 201
        tampered = bytearray(portable.decode_text(signed))
        tampered[-40] ^= 1
        for text, says in ((unsigned, "unsigned"), (portable.encode_text(bytes(tampered)), "signature does not match")):
            r = c.post("/v1/sessions", json={"state": text})
            assert r.status_code == 409 and says in r.json()["error"]["message"], r.text


def test_completions_continue_from_a_state_and_return_one(server: Server) -> None:
    import openai

    with server.client() as c:
        sid = c.post("/v1/sessions", json={"prompt": "ROMEO:", "seed": 9}).json()["id"]
        state = exported(c, sid)
        expected = continued(c, sid, 30)
        after = exported(c, sid)
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    answer = client.completions.create(
        model=MODEL, prompt="", max_tokens=30, extra_body={"state": state, "return_state": True, **SAMPLING}
    )
    choice = answer.choices[0]
    assert choice.text == expected and choice.model_extra is not None and choice.model_extra["state"] == after
    several = client.completions.create(
        model=MODEL, prompt="", max_tokens=30, n=3, extra_body={"state": state, **SAMPLING}
    )
    assert several.choices[0].text == expected and len({c.text for c in several.choices}) == 3
    with pytest.raises(openai.BadRequestError, match="return_state needs stream false"):
        client.completions.create(model=MODEL, prompt="", stream=True, extra_body={"return_state": True})

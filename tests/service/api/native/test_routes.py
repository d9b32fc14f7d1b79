"""The HTTP API against a real uvicorn server on 127.0.0.1, with a real httpx client."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.utils import Server, run_server


def sse_events(response: httpx.Response) -> list[dict | str]:
    events: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def test_health_ready_models(server: Server) -> None:
    with server.client() as c:
        assert c.get("/healthz").json()["status"] == "ok"
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and ready["failed"] == {}
        assert ready["models"] == ["tiny-gru", "tiny-lstm", "tiny-rnn"]
        models = c.get("/v1/models").json()
        assert models["object"] == "list"
        by_id = {m["id"]: m for m in models["data"]}
        assert by_id["tiny-gru"]["cell"] == "gru" and by_id["tiny-lstm"]["hidden_size"] == 48
        assert c.get("/docs").status_code == 200 and "/v1/generate" in c.get("/openapi.json").text


def test_generate_json_is_reproducible_with_a_seed(server: Server) -> None:
    body = {"prompt": "ROMEO:", "max_new_chars": 80, "seed": 11, "temperature": 0.9}
    with server.client() as c:
        a = c.post("/v1/generate", json=body).json()
        b = c.post("/v1/generate", json=body).json()
        other = c.post("/v1/generate", json=body | {"seed": 12}).json()
    assert a["text"] == b["text"] != other["text"]
    assert a["finish_reason"] == "length" and a["usage"] == {
        "prompt_chars": 6,
        "generated_chars": 80,
    }
    assert len(a["text"]) == 80 and a["model"] == "tiny-lstm" and a["session_id"] is None


def test_sse_framing_and_text_equals_the_json_answer(server: Server) -> None:
    body = {
        "model": "tiny-gru",
        "prompt": "KING:",
        "max_new_chars": 50,
        "seed": 3,
        "logprobs": True,
    }
    with server.client() as c:
        whole = c.post("/v1/generate", json=body).json()
        with c.stream("POST", "/v1/generate", json=body | {"stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert isinstance(final, dict) and final["finish_reason"] == "length"
    assert final["usage"] == {"prompt_chars": 5, "generated_chars": 50}
    chunks = [e for e in events[:-2] if isinstance(e, dict)]
    assert "".join(e["text"] for e in chunks) == whole["text"]
    logprobs = [lp for e in chunks for lp in e["logprobs"]]
    assert len(logprobs) == 50 and all(lp <= 0 for lp in logprobs)
    assert logprobs == pytest.approx(whole["logprobs"])


def test_session_continue_equals_one_long_generation(server: Server) -> None:
    with server.client() as c:
        long = c.post("/v1/generate", json={"prompt": "JULIET:", "max_new_chars": 90, "seed": 5}).json()["text"]
        s = c.post("/v1/sessions", json={"prompt": "JULIET:", "seed": 5})
        assert s.status_code == 201 and s.json()["history_chars"] == 7
        sid = s.json()["id"]
        parts = [c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 30}).json() for _ in range(3)]
        assert all(p["session_id"] == sid for p in parts)
        assert "".join(p["text"] for p in parts) == long
        assert c.get(f"/v1/sessions/{sid}").json()["history_chars"] == 7 + 90


def test_generate_with_session_id_on_the_generic_route(server: Server) -> None:
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"prompt": "A", "seed": 1}).json()["id"]
        r = c.post("/v1/generate", json={"session_id": sid, "max_new_chars": 5}).json()
        assert r["session_id"] == sid and len(r["text"]) == 5
        wrong = c.post("/v1/generate", json={"session_id": sid, "model": "tiny-gru"})
        assert wrong.status_code == 422 and wrong.json()["error"]["field"] == "model"


def test_feed_fork_reset_delete(server: Server) -> None:
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"seed": 9}).json()["id"]
        fed = c.post(f"/v1/sessions/{sid}/feed", json={"text": "To be, or not to be"}).json()
        assert fed["usage"] == {"prompt_chars": 19, "generated_chars": 0} and fed["session"]["history_chars"] == 19
        fork = c.post(f"/v1/sessions/{sid}/fork")
        assert fork.status_code == 201
        fid = fork.json()["id"]
        # A fork continues exactly as the original would: same state, same RNG stream.
        a = c.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 40}).json()["text"]
        b = c.post(f"/v1/sessions/{fid}/generate", json={"max_new_chars": 40}).json()["text"]
        assert a == b
        # ...and from then on they are independent.
        c.post(f"/v1/sessions/{sid}/feed", json={"text": "xyz"})
        assert c.get(f"/v1/sessions/{fid}").json()["history_chars"] == 59
        fresh = c.post("/v1/generate", json={"prompt": "To be, or not to be", "max_new_chars": 40, "seed": 9}).json()
        assert fresh["text"] == a  # feed == prompt
        reset = c.post(f"/v1/sessions/{sid}/reset").json()
        assert reset["history_chars"] == 0
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        gone = c.get(f"/v1/sessions/{sid}")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


def test_stop_sequences(server: Server) -> None:
    with server.client() as c:
        free = c.post("/v1/generate", json={"prompt": "ROMEO:", "max_new_chars": 300, "temperature": 0}).json()["text"]
        stop = free[40:43]
        r = c.post(
            "/v1/generate",
            json={"prompt": "ROMEO:", "max_new_chars": 300, "temperature": 0, "stop": [stop]},
        ).json()
    assert r["finish_reason"] == "stop" and r["text"] == free[: free.index(stop)]


def _scheduler_idle(server: Server, model: str = "tiny-lstm", timeout: float = 5.0) -> bool:
    scheduler = server.app.state.service.schedulers[model]  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scheduler.active == 0:
            return True
        time.sleep(0.01)
    return False


def test_sse_disconnect_stops_the_generation_and_frees_the_session(server: Server) -> None:
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"prompt": "A", "seed": 1}).json()["id"]
        with c.stream("POST", f"/v1/sessions/{sid}/generate", json={"max_new_chars": 100_000, "stream": True}) as r:
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                if got >= 5:
                    break
        # The client hung up mid-stream: the job leaves the batch and the session's lease ends.
        assert _scheduler_idle(server)
        deadline = time.monotonic() + 5
        while (status := c.post(f"/v1/sessions/{sid}/feed", json={"text": "a"}).status_code) == 409:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert status == 200
        info = c.get(f"/v1/sessions/{sid}").json()
        assert 1 + 5 <= info["history_chars"] < 1 + 100_000


def test_busy_session_answers_409(server: Server) -> None:
    with server.client() as c, server.client() as c2:
        sid = c.post("/v1/sessions", json={"prompt": "A"}).json()["id"]
        with c.stream("POST", f"/v1/sessions/{sid}/generate", json={"max_new_chars": 100_000, "stream": True}) as r:
            # Keep the iterator: a dropped one closes the response, which is a disconnect.
            lines = r.iter_lines()
            assert r.status_code == 200 and next(lines).startswith("data: ")
            busy = c2.post(f"/v1/sessions/{sid}/generate", json={"max_new_chars": 5})
            assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy"
            assert c2.delete(f"/v1/sessions/{sid}").status_code == 409
        assert _scheduler_idle(server)


@pytest.mark.parametrize(
    ("path", "body", "status", "field", "fragment"),
    [
        ("/v1/generate", {"model": "nope"}, 404, "model", "does not exist"),
        ("/v1/generate", {"prompt": "héllo€"}, 422, "prompt", "'é', '€'"),
        ("/v1/generate", {"temperature": -1}, 422, "temperature", "greater than or equal to 0"),
        ("/v1/generate", {"top_p": 0}, 422, "top_p", "greater than 0"),
        ("/v1/generate", {"top_k": -2}, 422, "top_k", "greater than or equal to 0"),
        ("/v1/generate", {"max_new_chars": 0}, 422, "max_new_chars", "greater than or equal to 1"),
        ("/v1/generate", {"max_new_chars": 100_001}, 422, "max_new_chars", "the limit is 100000"),
        ("/v1/generate", {"prompt": "a" * 20_001}, 413, "prompt", "the limit is 20000"),
        ("/v1/generate", {"stop": [""]}, 422, "stop.0", "at least 1 character"),
        ("/v1/generate", {"seed": -1}, 422, "seed", "greater than or equal to 0"),
        ("/v1/generate", {"temprature": 1}, 422, "temprature", "Extra inputs are not permitted"),
        ("/v1/generate", {"max_new_chars": "many"}, 422, "max_new_chars", "valid integer"),
        ("/v1/sessions", {"model": "nope"}, 404, "model", "does not exist"),
        ("/v1/sessions/missing/generate", {}, 404, "session_id", "does not exist"),
        ("/v1/sessions/missing/feed", {"text": "a"}, 404, "session_id", "does not exist"),
        ("/v1/sessions/missing/fork", {}, 404, "session_id", "does not exist"),
        ("/v1/sessions/missing/reset", None, 404, "session_id", "does not exist"),
    ],
)
def test_bad_input(server: Server, path: str, body: dict | None, status: int, field: str, fragment: str) -> None:
    with server.client() as c:
        r = c.post(path, json=body) if body is not None else c.post(path)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error.get("field") == field and fragment in error["message"], error


def test_feed_bad_text(server: Server) -> None:
    with server.client() as c:
        sid = c.post("/v1/sessions", json={}).json()["id"]
        empty = c.post(f"/v1/sessions/{sid}/feed", json={"text": ""})
        assert empty.status_code == 422 and empty.json()["error"]["field"] == "text"
        oov = c.post(f"/v1/sessions/{sid}/feed", json={"text": "ok ✓"})
        assert oov.status_code == 422 and "'✓'" in oov.json()["error"]["message"]
        assert c.get(f"/v1/sessions/{sid}").json()["history_chars"] == 0  # nothing half-read


def test_malformed_requests_never_500(server: Server) -> None:
    with server.client() as c:
        bad_json = c.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
        assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
        array = c.post("/v1/generate", json=[1, 2])
        assert array.status_code == 422
        no_body = c.post("/v1/sessions/x/feed")
        assert no_body.status_code == 422 and "required" in no_body.json()["error"]["message"]
        assert c.get("/v1/nothing-here").status_code == 404
        assert c.put("/v1/generate").status_code == 405
        binary = c.post("/v1/generate", content=b"\xff\xfe\x00", headers={"content-type": "application/json"})
        assert binary.status_code in (400, 422)


def test_metrics(server: Server) -> None:
    with server.client() as c:
        c.post("/v1/generate", json={"prompt": "A", "max_new_chars": 10})
        sid = c.post("/v1/sessions", json={"prompt": "ABC"}).json()["id"]
        text = c.get("/metrics").text
    assert 'charstream_requests_total{method="POST",route="/v1/generate",status="200"}' in text
    assert "charstream_generated_chars_total" in text and "charstream_step_seconds_bucket" in text
    assert "charstream_batch_size_bucket" in text and "charstream_session_memory_bytes" in text
    sessions = next(line for line in text.splitlines() if line.startswith("charstream_sessions "))
    assert float(sessions.split()[1]) >= 1
    state = next(line for line in text.splitlines() if line.startswith("charstream_session_state_bytes "))
    assert float(state.split()[1]) >= 2 * 2 * 48 * 4
    assert sid


def test_api_key(models_dir: Path) -> None:
    with run_server(models_dir=models_dir, api_key="s3cret") as s, s.client() as c:
        assert c.get("/healthz").status_code == 200  # probes need no key
        missing = c.post("/v1/generate", json={})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        assert c.post("/v1/generate", json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert (
            c.post(
                "/v1/generate",
                json={"max_new_chars": 3},
                headers={"Authorization": "Bearer s3cret"},
            ).status_code
            == 200
        )
        assert c.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        # The key is checked before the body is read: a bad or huge body without the key is a 401.
        for body in (b"{not json", b"[" * 100_000, b"x" * 5_000_000):
            r = c.post("/v1/generate", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert c.post("/v1/generate", json={}, headers={"X-API-Key": ""}).status_code == 401
        assert c.post("/v1/sessions/x/feed", json={}, headers={"Authorization": "Bearer"}).status_code == 401


def test_session_cap_gives_429_with_retry_after(models_dir: Path) -> None:
    with run_server(models_dir=models_dir, max_sessions=2, session_ttl_s=60) as s, s.client() as c:
        assert c.post("/v1/sessions", json={}).status_code == 201
        assert c.post("/v1/sessions", json={}).status_code == 201
        full = c.post("/v1/sessions", json={})
        assert full.status_code == 429 and int(full.headers["Retry-After"]) > 0
        assert "maximum of 2 sessions" in full.json()["error"]["message"]


def test_idle_sessions_expire(models_dir: Path) -> None:
    with run_server(models_dir=models_dir, session_ttl_s=0.3) as s, s.client() as c:
        sid = c.post("/v1/sessions", json={}).json()["id"]
        assert c.get(f"/v1/sessions/{sid}").status_code == 200
        time.sleep(0.5)
        assert c.get(f"/v1/sessions/{sid}").status_code == 404


def test_broken_model_is_reported_and_the_others_serve(models_dir: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(models_dir / "tiny-gru", tmp_path / "good")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.onnx").write_bytes(b"this is not onnx")
    with run_server(models_dir=tmp_path) as s, s.client() as c:
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and ready["models"] == ["good"] and "broken" in ready["failed"]
        r = c.post("/v1/generate", json={"model": "broken"})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
        assert c.post("/v1/generate", json={"max_new_chars": 4}).status_code == 200


def test_no_models_is_not_ready(tmp_path: Path) -> None:
    with run_server(models_dir=tmp_path) as s, s.client() as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not_ready" and r.json()["failed"]
        g = c.post("/v1/generate", json={})
        assert g.status_code == 503 and "no model is loaded" in g.json()["error"]["message"]

"""The OpenAI-compatible routes against a real server, with the official `openai` client, sync and async."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from service.api.errors import error_response
from service.errors import InvalidInput, TooManySessions
from tests.utils import Server, run_server

MODEL = "tiny-lstm"
KEY = "s3cret"


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[OpenAI]:
    # No retries: a test that expects an error sees the first answer.
    with OpenAI(base_url=f"{server.base_url}/v1", api_key="any", max_retries=0) as c:
        yield c


def extra(obj: Any) -> dict[str, Any]:
    """Fields the client's models do not declare (charstream's extras)."""
    return dict(obj.model_extra or {})


def stream_texts(chunks: list[Any]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    return texts


# -- models ----------------------------------------------------------------------------------------


def test_models_list_retrieve_and_delete(client: OpenAI) -> None:
    models = client.models.list().data
    assert sorted(m.id for m in models) == ["tiny-gru", "tiny-lstm", "tiny-rnn"]
    for m in models:
        assert m.object == "model" and m.owned_by == "charstream" and m.created > 1_600_000_000
        facts = extra(m)
        assert facts["num_layers"] == 2 and facts["hidden_size"] == 48 and facts["vocab_size"] > 20
        assert facts["val_loss"] > 0 and facts["cell"] in ("lstm", "gru", "rnn")
    gru = client.models.retrieve("tiny-gru")
    assert gru.id == "tiny-gru" and extra(gru)["cell"] == "gru"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("nope")
    assert missing.value.code == "not_found" and "does not exist" in missing.value.message
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.models.delete("tiny-lstm")
    assert "cannot be deleted" in denied.value.message


# -- completions -----------------------------------------------------------------------------------


def test_a_completion_is_what_the_native_route_samples_with_the_same_seed(client: OpenAI, server: Server) -> None:
    a = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=60, seed=11, temperature=0.9)
    b = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=60, seed=11, temperature=0.9)
    with server.client() as c:
        native = c.post(
            "/v1/generate", json={"prompt": "ROMEO:", "max_new_chars": 60, "seed": 11, "temperature": 0.9}
        ).json()
    assert a.object == "text_completion" and a.id.startswith("cmpl-") and a.model == MODEL
    assert len(a.choices) == 1 and a.choices[0].index == 0 and a.choices[0].finish_reason == "length"
    assert a.choices[0].text == b.choices[0].text == native["text"] and len(native["text"]) == 60
    assert a.choices[0].logprobs is None
    assert a.usage is not None and (a.usage.prompt_tokens, a.usage.completion_tokens, a.usage.total_tokens) == (
        6,
        60,
        66,
    )
    assert extra(a)["session_id"] is None  # stateless
    default = client.completions.create(model=MODEL, prompt="ROMEO:")
    assert len(default.choices[0].text) == 16  # OpenAI's default max_tokens


def test_n_choices_each_have_their_own_stream_and_one_seed_reproduces_them(client: OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, prompt="KING:", max_tokens=40, seed=3, temperature=1.0)
    four = client.completions.create(n=4, **kwargs)
    again = client.completions.create(n=4, best_of=4, **kwargs)  # best_of = n is accepted
    one = client.completions.create(**kwargs)
    texts = [c.text for c in four.choices]
    assert [c.index for c in four.choices] == [0, 1, 2, 3]
    assert texts == [c.text for c in again.choices] and len(set(texts)) == 4
    assert texts[0] == one.choices[0].text  # the first choice takes the seed itself
    assert four.usage is not None and four.usage.completion_tokens == 160 and four.usage.prompt_tokens == 5


def test_a_list_of_prompts_gives_n_choices_per_prompt_in_order(client: OpenAI) -> None:
    both = client.completions.create(model=MODEL, prompt=["ROMEO:", "JULIET:"], n=2, max_tokens=30, seed=5)
    romeo = client.completions.create(model=MODEL, prompt="ROMEO:", n=2, max_tokens=30, seed=5)
    juliet = client.completions.create(model=MODEL, prompt="JULIET:", max_tokens=30, seed=5)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices[:2]] == [c.text for c in romeo.choices]
    assert both.choices[2].text == juliet.choices[0].text
    assert both.usage is not None and both.usage.prompt_tokens == 13 and both.usage.completion_tokens == 120


def test_streaming_gives_the_same_text_with_a_usage_chunk_last(client: OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, prompt="ROMEO:", max_tokens=50, seed=8, n=2)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert stream_texts(chunks) == {c.index: c.text for c in whole.choices}
    assert all(c.object == "text_completion" and c.id == chunks[0].id and c.model == MODEL for c in chunks)
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (6, 100, 106)
    assert all(c.usage is None for c in chunks[:-1])
    finishes = {ch.index: ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason}
    assert finishes == {0: "length", 1: "length"}

    plain = list(client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, seed=8, stream=True))
    assert all(c.usage is None and c.choices for c in plain)
    assert stream_texts(plain)[0] == whole.choices[0].text[:20]


def test_the_async_client_streams_and_runs_requests_concurrently(server: Server, client: OpenAI) -> None:
    expected = [
        client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=40, seed=s).choices[0].text for s in range(4)
    ]

    async def main() -> tuple[list[str], str]:
        async with AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="any", max_retries=0) as ac:
            answers = await asyncio.gather(
                *(ac.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=40, seed=s) for s in range(4))
            )
            streamed = ""
            stream = await ac.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=40, seed=2, stream=True)
            async for chunk in stream:
                streamed += "".join(c.text for c in chunk.choices)
            return [a.choices[0].text for a in answers], streamed

    texts, streamed = asyncio.run(main())
    assert texts == expected and streamed == expected[2]


def test_stop_sequences_string_and_list(client: OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=150, temperature=0).choices[0].text
    stop = full[60:63]
    cut = full[: full.find(stop)]
    one = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=150, temperature=0, stop=stop)
    listed = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=150, temperature=0, stop=["@@@", stop])
    streamed = list(
        client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=150, temperature=0, stop=[stop], stream=True)
    )
    assert one.choices[0].text == listed.choices[0].text == stream_texts(streamed)[0] == cut
    assert one.choices[0].finish_reason == listed.choices[0].finish_reason == "stop"
    assert [ch.finish_reason for c in streamed for ch in c.choices if ch.finish_reason] == ["stop"]
    assert one.usage is not None and one.usage.completion_tokens >= len(cut) + len(stop)


def test_logprobs_per_character_with_alternatives_and_offsets(client: OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, prompt="ROMEO:", max_tokens=30, temperature=0, logprobs=3)
    choice = client.completions.create(**kwargs).choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens == list(choice.text) and lp.text_offset == list(range(30))
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob is not None and logprob <= 0 and top is not None and len(top) == 3
        assert top[token] == pytest.approx(logprob) == pytest.approx(max(top.values()))  # greedy: the best one

    chunks = list(client.completions.create(stream=True, **kwargs))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].text]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    assert [x for s in streamed for x in s.token_logprobs] == pytest.approx(lp.token_logprobs)

    zero = client.completions.create(**(kwargs | {"logprobs": 0})).choices[0].logprobs
    assert zero is not None and zero.top_logprobs is not None and zero.token_logprobs is not None
    assert [list(t) for t in zero.top_logprobs] == [[c] for c in lp.tokens]  # only the chosen character


def test_echo_returns_the_prompt_and_scores_it(client: OpenAI) -> None:
    echoed = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, seed=1, echo=True)
    plain = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, seed=1)
    assert echoed.choices[0].text == "ROMEO:" + plain.choices[0].text

    # Scoring a text, as evaluation tools do: echo, logprobs, max_tokens 0.
    greedy = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=25, temperature=0, logprobs=2)
    text = "ROMEO:" + greedy.choices[0].text
    scored = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    lp = choice.logprobs
    assert choice.text == text and choice.finish_reason == "length"
    assert lp is not None and lp.tokens == list(text) and lp.text_offset == list(range(len(text)))
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing came before it
    assert greedy.choices[0].logprobs is not None
    assert lp.token_logprobs[6:] == pytest.approx(greedy.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert scored.usage is not None and scored.usage.completion_tokens == 0

    chunks = list(client.completions.create(model=MODEL, prompt=text, max_tokens=3, echo=True, logprobs=2, stream=True))
    first = chunks[0].choices[0]
    assert first.text == text and first.logprobs is not None and first.logprobs.tokens == list(text)
    assert first.logprobs.token_logprobs == pytest.approx(lp.token_logprobs)
    assert stream_texts(chunks)[0].startswith(text) and len(stream_texts(chunks)[0]) == len(text) + 3


def test_unknown_fields_are_ignored_and_logged(client: OpenAI, caplog: pytest.LogCaptureFixture) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, prompt="ROMEO:", max_tokens=20, seed=4, user="someone")
    with caplog.at_level(logging.WARNING, logger="charstream.openai"):
        odd = client.completions.create(extra_body={"length_penalty": 1.3, "min_tokens": 2}, **kwargs)
    assert odd.choices[0].text == client.completions.create(**kwargs).choices[0].text
    assert any("length_penalty, min_tokens" in r.getMessage() for r in caplog.records)


def test_penalties_are_served_not_refused(client: OpenAI) -> None:
    """frequency_penalty and presence_penalty (OpenAI's), min_p and repetition_penalty (vLLM's extra_body)."""
    kwargs: dict[str, Any] = dict(model=MODEL, prompt="ROMEO:", max_tokens=60, temperature=0)
    plain = client.completions.create(**kwargs).choices[0].text
    for extra_fields in ({"frequency_penalty": 1.5}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0}):
        text = client.completions.create(extra_body=extra_fields, **kwargs).choices[0].text
        assert len(text) == 60 and text != plain, extra_fields
    assert (
        client.completions.create(extra_body={"min_p": 0.5}, **kwargs).choices[0].text == plain
    )  # greedy keeps the top


def test_leaving_a_stream_early_stops_every_choice(client: OpenAI, server: Server) -> None:
    service = server.app.state.service  # type: ignore[attr-defined]
    stream = client.completions.create(model=MODEL, prompt=["A", "B"], n=3, max_tokens=100_000, stream=True)
    assert next(iter(stream)).choices
    assert service.running >= 6  # three choices for each prompt, all running
    stream.close()
    deadline = time.monotonic() + 10
    while service.running:
        assert time.monotonic() < deadline, f"{service.running} generations still running"
        time.sleep(0.02)


# -- sessions as an extension ----------------------------------------------------------------------


def test_a_session_continues_exactly_like_one_long_completion(client: OpenAI, server: Server) -> None:
    long = client.completions.create(model=MODEL, prompt="JULIET:", max_tokens=80, temperature=0).choices[0].text
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"model": MODEL, "prompt": "JULIET:"}).json()["id"]
        empty = c.post("/v1/sessions", json={"model": MODEL}).json()["id"]
    greedy: dict[str, Any] = dict(model=MODEL, temperature=0, max_tokens=40)
    first = client.completions.create(prompt="", extra_body={"session_id": sid}, **greedy)
    chunks = list(client.completions.create(prompt="", stream=True, extra_body={"session_id": sid}, **greedy))
    assert first.choices[0].text + stream_texts(chunks)[0] == long
    assert extra(first)["session_id"] == sid and all(extra(c)["session_id"] == sid for c in chunks)
    with server.client() as c:
        assert c.get(f"/v1/sessions/{sid}").json()["history_chars"] == len("JULIET:") + 80

    # A session with no history reads the prompt first, as the native session routes do.
    fresh = client.completions.create(prompt="JULIET:", extra_body={"session_id": empty}, **greedy)
    assert fresh.choices[0].text == long[:40]


def test_session_misuse_gets_typed_errors(client: OpenAI, server: Server) -> None:
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"model": MODEL, "prompt": "JULIET:"}).json()["id"]
    with pytest.raises(openai.BadRequestError) as several:
        client.completions.create(model=MODEL, prompt="", n=2, extra_body={"session_id": sid})
    assert several.value.param == "n" and "one history" in several.value.message
    with pytest.raises(openai.BadRequestError) as prompts:
        client.completions.create(model=MODEL, prompt=["a", "b"], extra_body={"session_id": sid})
    assert prompts.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as other_model:
        client.completions.create(model="tiny-gru", prompt="", extra_body={"session_id": sid})
    assert other_model.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=MODEL, prompt="", extra_body={"session_id": "no-such-session"})


def test_a_busy_session_is_a_conflict(client: OpenAI, server: Server) -> None:
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"model": MODEL}).json()["id"]
    body: dict[str, Any] = dict(model=MODEL, prompt="A", extra_body={"session_id": sid})
    stream = client.completions.create(max_tokens=100_000, stream=True, **body)
    next(iter(stream))  # running
    with pytest.raises(openai.ConflictError) as busy:
        client.completions.create(max_tokens=5, **body)
    assert busy.value.code == "session_busy"
    stream.close()  # the generation stops and the session is free again
    deadline = time.monotonic() + 10
    while True:
        try:
            assert len(client.completions.create(max_tokens=5, **body).choices[0].text) == 5
            break
        except openai.ConflictError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


# -- many choices ----------------------------------------------------------------------------------


def test_a_thousand_choices_in_one_request(client: OpenAI) -> None:
    answer = client.completions.create(model=MODEL, prompt="ROMEO:", n=1000, max_tokens=4, seed=8)
    assert [c.index for c in answer.choices] == list(range(1000))
    assert all(len(c.text) == 4 for c in answer.choices)
    assert answer.usage is not None and answer.usage.completion_tokens == 4000
    assert len({c.text for c in answer.choices}) > 1


def test_unique_choices_are_distinct_and_reproducible(client: OpenAI) -> None:
    body = {"model": MODEL, "prompt": "ROMEO:", "n": 150, "max_tokens": 2, "temperature": 0.6, "seed": 4}
    plain = [c.text for c in client.completions.create(**body).choices]  # type: ignore[call-overload]
    assert len(set(plain)) < len(plain)  # two characters, 150 times: repeats are certain
    unique = client.completions.create(**body, extra_body={"unique": True})  # type: ignore[call-overload]
    texts = [c.text for c in unique.choices]
    assert len(texts) == len(set(texts)) and [c.index for c in unique.choices] == list(range(len(texts)))
    # The first distinct texts of the same seeds come first, in order; repeats were sampled again.
    first = list(dict.fromkeys(plain))
    assert texts[: len(first)] == first and len(texts) > len(first)
    again = client.completions.create(**body, extra_body={"unique": True})  # type: ignore[call-overload]
    assert [c.text for c in again.choices] == texts
    assert unique.usage is not None and unique.usage.completion_tokens > 2 * len(texts)  # retries counted
    greedy = client.completions.create(
        model=MODEL, prompt="ROMEO:", n=5, max_tokens=8, temperature=0, extra_body={"unique": True}
    )
    assert len(greedy.choices) == 1  # greedy makes one text however often it runs


# -- errors ----------------------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"suffix": "the end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"logit_bias": {"100000": 5}}, "logit_bias"),
    ({"logit_bias": {"3": -101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"structured_outputs": {"regex": "(a|b"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),  # tiny-lstm has no braces
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
        "response_format.json_schema",
    ),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    # ~0.13 ms a mask: one row is welcome, 200 at once would add ~27 ms to every step of the model.
    ({"structured_outputs": {"regex": "a{500}"}, "n": 200}, "n"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": [[1, 2], [3]]}, "prompt"),
    ({"prompt": "ROMEO: \u2603"}, "prompt"),
    ({"prompt": ["ROMEO:", "\u2603"]}, "prompt"),  # the first prompt's choices already started: cancelled
    ({"max_tokens": 200_000}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"logprobs": 21}, "logprobs"),
    ({"n": 0}, "n"),
    ({"n": 1001}, "n"),
    ({"n": 100, "prompt": ["A"] * 11}, "n"),
    ({"unique": "maybe"}, "unique"),
    ({"unique": True, "stream": True}, "unique"),
    ({"stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}, "stop"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_REQUESTS, ids=[p for _, p in BAD_REQUESTS])
def test_invalid_requests_are_400_naming_the_field(client: OpenAI, fields: dict[str, Any], param: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 5} | fields
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=body.pop("model"), prompt=body.pop("prompt"), extra_body=body)
    assert error.value.status_code == 400 and error.value.type == "BadRequestError"
    assert error.value.code == "invalid_input" and error.value.param is not None
    assert error.value.param.startswith(param), error.value.message


def test_error_bodies_have_openai_shape_and_native_routes_keep_theirs(server: Server) -> None:
    with server.client() as c:
        bad = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
        missing = c.post("/v1/completions", json={"model": MODEL})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"
        unknown = c.get("/v1/models/nope")
        assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "NotFoundError"
        native = c.post("/v1/generate", json={"max_new_chars": 0})
        assert native.status_code == 422 and set(native.json()["error"]) == {"code", "message", "field"}
    # No route here hands out sessions, so 429 cannot happen on them today; its shape is still OpenAI's.
    full = error_response(TooManySessions("full", headers={"Retry-After": "3"}), "/v1/completions")
    assert full.status_code == 429 and full.headers["Retry-After"] == "3"
    assert b'"type":"RateLimitError"' in full.body
    assert error_response(InvalidInput("x"), "/v1/generate").status_code == 422


def test_a_wrong_key_is_an_authentication_error(models_dir: Path) -> None:
    with run_server(models_dir=models_dir, api_key=KEY) as s:
        with OpenAI(base_url=f"{s.base_url}/v1", api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as error:
                wrong.completions.create(model=MODEL, prompt="A", max_tokens=3)
            assert error.value.code == "unauthorized" and error.value.type == "AuthenticationError"
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
        with OpenAI(base_url=f"{s.base_url}/v1", api_key=KEY, max_retries=0) as right:
            assert len(right.completions.create(model=MODEL, prompt="A", max_tokens=3).choices[0].text) == 3
        r = httpx.post(f"{s.base_url}/v1/completions", json={})
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_model_that_failed_to_load_is_an_internal_server_error(models_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(models_dir / "tiny-gru", tmp_path / "good")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.onnx").write_bytes(b"this is not onnx")
    with run_server(models_dir=tmp_path) as s, OpenAI(base_url=f"{s.base_url}/v1", api_key="x", max_retries=0) as c:
        with pytest.raises(openai.InternalServerError) as error:
            c.completions.create(model="broken", prompt="A")
        assert error.value.status_code == 503 and "failed to load" in error.value.message
        assert [m.id for m in c.models.list().data] == ["good"]


def test_a_failure_mid_stream_reaches_the_client_as_an_error(models_dir: Path) -> None:
    with (
        run_server(models_dir=models_dir, default_model=MODEL, max_new_chars=100_000) as s,
        OpenAI(base_url=f"{s.base_url}/v1", api_key="x", max_retries=0) as c,
    ):
        engine = s.app.state.service.schedulers[MODEL].engine  # type: ignore[attr-defined]
        chunks = iter(c.completions.create(model=MODEL, prompt="A", max_tokens=100_000, stream=True))
        assert next(chunks).choices[0].text

        def broken(batch: int) -> None:
            raise RuntimeError("injected")

        engine.binding = broken  # the next step fails inside the scheduler
        with pytest.raises(openai.APIError) as error:
            for _ in chunks:
                pass
        assert error.value.body == {
            "message": "the generation failed on the server",
            "type": "InternalServerError",
            "param": None,
            "code": "internal",
        }


def test_logit_bias_moves_the_draw_but_not_the_logprobs(client: OpenAI) -> None:
    """-100 bans a character, +100 all but forces it; the reported logprobs stay the model's own."""
    plain = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, temperature=0, logprobs=1)
    text = plain.choices[0].text
    models = client.models.list()
    vocab_size = next(m for m in models.data if m.id == MODEL).model_extra["vocab_size"]
    assert vocab_size > 0
    first = text[0]
    # Character ids are vocabulary positions: find the first character's id from a forced run.
    ids = {}
    for char_id in range(vocab_size):
        forced = client.completions.create(
            model=MODEL, prompt="ROMEO:", max_tokens=1, temperature=0, logit_bias={str(char_id): 100}
        )
        ids[forced.choices[0].text] = char_id
    assert len(ids) == vocab_size  # each id forces its own character
    banned = client.completions.create(
        model=MODEL, prompt="ROMEO:", max_tokens=20, temperature=0, logprobs=1, logit_bias={str(ids[first]): -100}
    )
    assert banned.choices[0].text[0] != first
    forced = client.completions.create(
        model=MODEL, prompt="ROMEO:", max_tokens=20, temperature=0.7, seed=3, logit_bias={str(ids["e"]): 100}
    )
    assert forced.choices[0].text == "e" * 20
    plain_lp, banned_lp = plain.choices[0].logprobs, banned.choices[0].logprobs
    assert plain_lp is not None and banned_lp is not None and plain_lp.top_logprobs and banned_lp.top_logprobs
    # The first position: the same distribution (the banned run also lists the character it chose).
    assert plain_lp.top_logprobs[0].items() <= banned_lp.top_logprobs[0].items()

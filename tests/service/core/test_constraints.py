"""Structured outputs: every sampled text meets its constraint, through the real scheduler and onnxruntime.

Two real models: the tiny Shakespeare LSTM (letters and punctuation) and a tiny LSTM trained here
on JSON lines, whose vocabulary has braces, quotes and digits. Each constraint is checked with
an independent checker (Python's `re`, `json` + `jsonschema`, a bracket counter), never with
llguidance itself.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.core.constraints import MASK_BUDGET_S, STEP_BUDGET_S, Compiled, ConstraintCompiler, ConstraintError
from service.core.engine import Engine
from service.core.events import DoneEvent, ErrorEvent, TextEvent
from service.core.jobs import Job
from service.core.sampling import ConstraintSpec, SamplingParams
from service.core.scheduler import Scheduler
from service.errors import InvalidInput, failure
from service.metrics import Metrics
from tests.utils import tiny_train_config

SAMPLES = 40  # per constraint, all in one batch


def json_corpus(n: int, seed: int = 0) -> str:
    """JSON lines with nested objects, lists, enums and numbers: a vocabulary JSON can be written in."""
    rng = random.Random(seed)
    words = ["red", "green", "blue", "alpha", "beta", "gamma", "x", "yz", "name", "id", "tags", "ok"]
    lines = []
    for _ in range(n):
        obj = {
            "name": rng.choice(words) + rng.choice(words),
            "id": rng.randint(0, 99999),
            "size": rng.choice(["S", "M", "L"]),
            "tags": [rng.choice(words) for _ in range(rng.randint(0, 3))],
            "ok": rng.choice([True, False, None]),
            "inner": {"x": rng.randint(-50, 50), "y": round(rng.random() * 10, 2)},
        }
        depth = rng.randint(0, 2)
        lines.append(json.dumps(obj) + " (" + "[" * depth + "a" + "]" * depth + ")")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def json_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """A tiny LSTM trained by the project's own loop on JSON lines, exported as the service reads it."""
    from training.export import export_many
    from training.train import train

    folder = tmp_path_factory.mktemp("json-model")
    corpus = folder / "json.txt"
    corpus.write_text(json_corpus(1500), encoding="utf-8")
    train(tiny_train_config(corpus, folder / "run", max_steps=80, eval_interval=80))
    export_many([str(folder / "run" / "best.pt")], str(folder / "models"), "fp32", names=["tiny-json"])
    return Engine(folder / "models" / "tiny-json" / "model.onnx")


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> Engine:
    return Engine(models_dir / "tiny-lstm" / "model.onnx")


def run_jobs(
    engine: Engine, specs: list[tuple[str, SamplingParams, int]], batching: bool = True
) -> list[tuple[str, str]]:
    """Each (prompt, params, seed) through one scheduler; the text and finish reason of each."""

    async def scenario() -> list[tuple[str, str]]:
        scheduler = Scheduler("m", engine, Metrics(), batching=batching)
        scheduler.start()
        jobs = []
        for prompt, params, seed in specs:
            matcher = None if params.constraint is None else scheduler.constraints.matcher(params.constraint)
            job = Job(
                prompt=[engine.info.vocab_index[c] for c in prompt],
                state=[np.zeros((engine.info.num_layers, engine.info.hidden_size), np.float32)]
                * len(engine.info.state_names),
                logits=None,
                params=params,
                rng=np.random.default_rng(seed),
                matcher=matcher,
            )
            scheduler.submit(job)
            jobs.append(job)
        out = []
        for job in jobs:
            texts: list[str] = []
            while True:
                events = await job.events.take()
                final = [e for e in events if isinstance(e, DoneEvent | ErrorEvent)]
                texts += [e.text for e in events if isinstance(e, TextEvent)]
                if final:
                    assert isinstance(final[0], DoneEvent), final[0]
                    out.append(("".join(texts), final[0].finish_reason))
                    break
        await scheduler.stop()
        return out

    return asyncio.run(scenario())


def sample(engine: Engine, kind: str, source: str, n: int = SAMPLES, max_new: int = 300) -> list[tuple[str, str]]:
    spec = ConstraintSpec(kind, source)
    temps = [1.0, 0.7, 1.5, 0.0]
    specs = [
        ("\n", SamplingParams(temperature=temps[i % 4], max_new_chars=max_new, constraint=spec), i) for i in range(n)
    ]
    return run_jobs(engine, specs)


def balanced(text: str, complete: bool) -> bool:
    """Brackets () and [] properly nested (a prefix of such a text when not complete)."""
    stack: list[str] = []
    pairs = {")": "(", "]": "["}
    for c in text:
        if c in "([":
            stack.append(c)
        elif c in ")]" and (not stack or stack.pop() != pairs[c]):
            return False
    return not stack if complete else True


def regex_check(pattern: str) -> Callable[[str], bool]:
    return lambda text: re.fullmatch(pattern, text) is not None


NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "size": {"enum": ["S", "M", "L"]},
        "inner": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50}, "ok": {"type": "boolean"}},
            "required": ["x", "ok"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3},
    },
    "required": ["size", "inner", "tags"],
    "additionalProperties": False,
}
BRACKETS = """
start: group
group: "(" item* ")" | "[" item* "]"
item: "a" | group
"""

# (kind, source, checker) on the Shakespeare model: bounded, so every sample completes.
SHAKESPEARE_CASES: list[tuple[str, str, Callable[[str], bool]]] = [
    ("regex", r"[A-Z][a-z]{2,6}", regex_check(r"[A-Z][a-z]{2,6}")),
    ("regex", r"(ROMEO|JULIET|KING)", regex_check(r"(ROMEO|JULIET|KING)")),
    ("regex", r"[a-z]{1,10} [a-z]{1,10}\.", regex_check(r"[a-z]{1,10} [a-z]{1,10}\.")),
    ("regex", r"(Thou|thee|thy) [a-z]{1,8}!", regex_check(r"(Thou|thee|thy) [a-z]{1,8}!")),
    ("regex", r"[A-Z]{2,4}:\n[A-Z][a-z ,]{5,30}[.?!]", regex_check(r"[A-Z]{2,4}:\n[A-Z][a-z ,]{5,30}[.?!]")),
    ("regex", r"(ab|a)(c|bc)?d", regex_check(r"(ab|a)(c|bc)?d")),
    ("regex", r"[aeiou]{3}", regex_check(r"[aeiou]{3}")),
    ("regex", r"((to|be), ){1,3}or not", regex_check(r"((to|be), ){1,3}or not")),
    ("regex", r"[^a-zA-Z\n]{1,5}", regex_check(r"[^a-zA-Z\n]{1,5}")),
    ("regex", r"\w{4} \w{4}", regex_check(r"[A-Za-z0-9_]{4} [A-Za-z0-9_]{4}")),
    (
        "choice",
        json.dumps(["ROMEO", "JULIET", "KING HENRY VI", "a"]),
        lambda t: t in {"ROMEO", "JULIET", "KING HENRY VI", "a"},
    ),
    ("choice", json.dumps(["yes", "no", "yesterday"]), lambda t: t in {"yes", "no", "yesterday"}),
    (
        "grammar",
        'start: "a" start "b" | "c"',
        lambda t: re.fullmatch(r"(a*)c(b*)", t) is not None and t.count("a") == t.count("b"),
    ),
    (
        "grammar",
        'start: name ": " line\nname: /[A-Z]{3,8}/\nline: /[a-z ]{1,20}/ "."',
        regex_check(r"[A-Z]{3,8}: [a-z ]{1,20}\."),
    ),
]

# On the JSON model: JSON Schemas (nested, enums), numbers, brackets.
JSON_CASES: list[tuple[str, str, Callable[[str], bool]]] = [
    ("json", json.dumps(NESTED_SCHEMA), lambda t: jsonschema.validate(json.loads(t), NESTED_SCHEMA) is None),
    (
        "json",
        json.dumps(
            {
                "type": "object",
                "properties": {"id": {"type": "integer"}},
                "required": ["id"],
                "additionalProperties": False,
            }
        ),
        lambda t: isinstance(json.loads(t)["id"], int) and len(json.loads(t)) == 1,
    ),
    ("json", json.dumps({"enum": ["red", "green", 3, None]}), lambda t: json.loads(t) in ["red", "green", 3, None]),
    ("regex", r"[0-9]{5}", regex_check(r"[0-9]{5}")),
    ("regex", r"-?(0|[1-9][0-9]{0,3})\.[0-9]{2}", regex_check(r"-?(0|[1-9][0-9]{0,3})\.[0-9]{2}")),
    ("regex", r'\{"id": [0-9]{1,4}\}', regex_check(r'\{"id": [0-9]{1,4}\}')),
    ("grammar", BRACKETS, lambda t: balanced(t, True) and set(t) <= set("()[]a")),
]


@pytest.mark.parametrize(("kind", "source", "check"), SHAKESPEARE_CASES, ids=[c[1][:30] for c in SHAKESPEARE_CASES])
def test_every_sample_matches_shakespeare(engine: Engine, kind: str, source: str, check: Callable[[str], bool]) -> None:
    for text, reason in sample(engine, kind, source):
        if reason == "stop":
            assert check(text), (source, text)
        else:  # only the unbounded nesting grammar may run out of characters first
            assert reason == "length" and kind == "grammar" and re.fullmatch("a*", text), (source, text, reason)


@pytest.mark.parametrize(("kind", "source", "check"), JSON_CASES, ids=[c[1][:30] for c in JSON_CASES])
def test_every_sample_matches_json_model(
    json_engine: Engine, kind: str, source: str, check: Callable[[str], bool]
) -> None:
    results = sample(json_engine, kind, source, max_new=400)
    stopped = [text for text, reason in results if reason == "stop"]
    assert len(stopped) >= len(results) // 2, results
    for text, reason in results:
        if reason == "stop":
            assert check(text), (source, text)


# Regexes built by hypothesis from literals, classes, groups, alternation and bounded repetition: the
# common syntax of Python's re and llguidance's (Rust) regex, every one of them finite.
LETTERS = "abcdeHIJ ,."


def _atom() -> st.SearchStrategy[str]:
    literal = st.sampled_from([re.escape(c) if c in ".," else c for c in LETTERS])
    klass = st.sets(st.sampled_from("abcdeHIJ"), min_size=1, max_size=4).map(lambda s: "[" + "".join(sorted(s)) + "]")
    return st.one_of(literal, klass)


def _regex(depth: int = 2) -> st.SearchStrategy[str]:
    atom = _atom()
    if depth:
        inner = _regex(depth - 1)
        atom = st.one_of(atom, st.lists(inner, min_size=1, max_size=3).map(lambda parts: "(" + "|".join(parts) + ")"))
    counted = st.tuples(atom, st.integers(0, 3), st.integers(0, 3)).map(
        lambda t: f"{t[0]}{{{min(t[1], t[2])},{max(t[1], t[2]) or 1}}}"
    )
    piece = st.one_of(atom, counted, atom.map(lambda a: a + "?"))
    return st.lists(piece, min_size=1, max_size=4).map("".join)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=_regex())
def test_hypothesis_regexes_match(engine: Engine, pattern: str) -> None:
    results = sample(engine, "regex", pattern, n=10, max_new=200)
    for text, reason in results:
        assert reason == "stop" and re.fullmatch(pattern, text), (pattern, text, reason)


def test_unconstrained_rows_are_untouched_and_batched_equals_unbatched(engine: Engine) -> None:
    """Constrained rows beside unconstrained ones: every text is the same batched or stepped alone, and
    the unconstrained ones are what they are with no constrained neighbour."""
    spec = ConstraintSpec("regex", r"[A-Z][a-z]{2,12}( [A-Z][a-z]{1,12})?")
    free = [("ROMEO:", SamplingParams(temperature=0.9, max_new_chars=60), seed) for seed in range(6)]
    bound = [("KING:", SamplingParams(temperature=0.9, max_new_chars=60, constraint=spec), 100 + s) for s in range(6)]
    mixed = [job for pair in zip(free, bound, strict=True) for job in pair]
    batched = run_jobs(engine, mixed, batching=True)
    alone = run_jobs(engine, mixed, batching=False)
    assert batched == alone
    assert batched[0::2] == run_jobs(engine, free, batching=True)
    assert all(re.fullmatch(spec.source, text) for text, _ in batched[1::2])


@pytest.mark.parametrize(
    ("kind", "source", "message"),
    [
        ("regex", "(a|b", "unclosed group"),
        ("regex", "Z€Z", "vocabulary lacks a character"),
        ("regex", "", "empty text"),
        ("json", json.dumps({"type": "object"}), "vocabulary lacks a character"),  # Shakespeare has no braces
        ("json", json.dumps({"type": "nonsense"}), "Invalid type: nonsense"),
        ("grammar", "start: foo", 'unknown name: "foo"'),
        ("choice", json.dumps(["€"]), "vocabulary lacks a character"),
        # Pathological: its first probe mask takes ~0.4 s (llguidance's lexer limits would end it a little later).
        ("regex", "((a{100}){100}){100}", "costly"),
        ("regex", "a{100000}", "costly"),  # cheap to compile, ~90 ms a mask (the budget is 0.5 ms): refused at once
    ],
)
def test_refused_with_the_compilers_message(engine: Engine, kind: str, source: str, message: str) -> None:
    compiler = ConstraintCompiler(engine.info.vocab)
    for _ in range(2):  # the second time from the cache
        with pytest.raises(ConstraintError, match=re.escape(message)):
            compiler.matcher(ConstraintSpec(kind, source))
    assert compiler.cached == 1


def test_a_mask_far_over_the_budget_ends_the_probe_at_once(engine: Engine) -> None:
    """With a budget no mask can meet, a cheap constraint is refused after its first mask (the probe
    would otherwise walk 8 x 16 characters); the budget is the compiler's, so a test sets it."""
    compiler = ConstraintCompiler(engine.info.vocab, mask_budget_s=1e-9)
    with pytest.raises(ConstraintError, match="too costly to follow"):
        compiler.matcher(ConstraintSpec("regex", "[a-z]{3}"))
    cheap = ConstraintCompiler(engine.info.vocab).submit(ConstraintSpec("regex", "[a-z]{3}")).result()
    assert 0 < cheap.mask_s < MASK_BUDGET_S  # what a request's rows are charged per step


def test_rows_at_once_are_held_to_the_step_budget(engine: Engine) -> None:
    """A constraint's measured mask cost times the rows that run it at once must fit STEP_BUDGET_S."""
    compiled = ConstraintCompiler(engine.info.vocab).submit(ConstraintSpec("regex", "[a-z]{3}")).result()
    costly = Compiled(compiled.matcher, compiled.vocab_size, mask_s=STEP_BUDGET_S / 10)
    costly.check_rows(10)
    with pytest.raises(ConstraintError, match=r"too costly for 11 rows at once.*at most 10 at once"):
        costly.check_rows(11)


def test_a_compile_in_flight_is_shared(engine: Engine) -> None:
    """Requests for a constraint being compiled get the same future, and it is compiled once."""
    compiler = ConstraintCompiler(engine.info.vocab)
    spec = ConstraintSpec("regex", "[A-Z][a-z]{2,8}", "structured_outputs.regex")
    with ThreadPoolExecutor(1) as pool:
        held = threading.Event()
        pool.submit(held.wait, 10)  # the one compile thread is busy: the compile below waits its turn
        first = compiler.submit(spec, pool)
        again = compiler.submit(ConstraintSpec("regex", "[A-Z][a-z]{2,8}", "response_format"), pool)
        assert again is first and not first.done()
        held.set()
        compiled = first.result(timeout=10)
    assert compiler.submit(spec).result() is compiled and compiler.cached == 1
    refused = ConstraintSpec("regex", "(a|b")
    with ThreadPoolExecutor(1) as pool:
        errors = [compiler.submit(refused, pool) for _ in range(3)]
        assert all(isinstance(f.exception(timeout=10), ConstraintError) for f in errors)
    assert compiler.cached == 2


def test_compiled_constraints_are_cached_per_model(engine: Engine) -> None:
    compiler = ConstraintCompiler(engine.info.vocab, kept=2)
    specs = [ConstraintSpec("regex", p) for p in ("[a-z]{3}", "[A-Z]{3}", "[a-c]{3}")]
    first = compiler.matcher(specs[0])
    again = compiler.matcher(specs[0])
    assert first.matcher is not again.matcher  # each job its own copy of the cached one
    compiler.matcher(specs[1])
    compiler.matcher(specs[2])
    assert compiler.cached == 2  # least recently used dropped


def test_json_properties_come_in_the_schemas_order(json_engine: Engine) -> None:
    order = {"type": "object", "properties": {"size": {"enum": ["S", "M"]}, "id": {"type": "integer"}}}
    schema = order | {"required": ["size", "id"], "additionalProperties": False}
    spec = ConstraintSpec("json", json.dumps(schema))  # as the API writes it (tests/service/api/test_structured.py)
    results = run_jobs(json_engine, [("\n", SamplingParams(max_new_chars=200, constraint=spec), s) for s in range(10)])
    for text, reason in results:
        if reason == "stop":
            assert list(json.loads(text)) == ["size", "id"], text
    assert any(reason == "stop" for _, reason in results)


def test_a_dead_end_reached_while_generating_ends_the_job_with_an_error(engine: Engine) -> None:
    """A constraint the probe walks did not refuse, which still needs a missing character after its
    first one: the job ends with an invalid_input error event, and the scheduler serves on."""
    import llguidance

    from service.core.constraints import CharMatcher

    source = 'start: "a" sep "b"\nsep: "€"'  # "a" may start it; the next rule needs a character the model lacks
    compiler = ConstraintCompiler(engine.info.vocab)
    with pytest.raises(ConstraintError, match="vocabulary lacks a character"):  # the compiler's walks find it
        compiler.matcher(ConstraintSpec("grammar", source))
    grammar = llguidance.LLMatcher.grammar_from_lark(source)  # compiled directly: nothing refuses it
    matcher = CharMatcher(llguidance.LLMatcher(compiler.tokenizer, grammar, log_level=0), len(engine.info.vocab))
    assert matcher.allowed.any()

    async def scenario() -> tuple[ErrorEvent | DoneEvent, str]:
        scheduler = Scheduler("m", engine, Metrics())
        scheduler.start()
        info = engine.info
        zero = [np.zeros((info.num_layers, info.hidden_size), np.float32)] * len(info.state_names)
        # Named as the request named it (here OpenAI's response_format), never a field it did not send.
        spec = ConstraintSpec("grammar", source, "response_format.json_schema")
        params = SamplingParams(max_new_chars=20, constraint=spec)
        job = Job(prompt=[info.vocab_index["\n"]], state=zero, logits=None, params=params, rng=np.random.default_rng(0))
        job.matcher = matcher
        after = Job(
            prompt=[info.vocab_index["\n"]],
            state=zero,
            logits=None,
            params=SamplingParams(max_new_chars=5),
            rng=np.random.default_rng(1),
        )
        scheduler.submit(job)
        scheduler.submit(after)
        finals = []
        for j in (job, after):
            while not (done := [e for e in await j.events.take() if isinstance(e, DoneEvent | ErrorEvent)]):
                pass
            finals.append(done[0])
        await scheduler.stop()
        assert isinstance(finals[1], DoneEvent) and finals[1].generated_chars == 5
        return finals[0], job.phase.name

    final, phase = asyncio.run(scenario())
    assert isinstance(final, ErrorEvent) and final.code == "invalid_input" and phase == "FAILED", final
    assert final.field == "response_format.json_schema" and final.message.startswith("response_format.json_schema:")
    error = failure(final.code, final.message, final.field)
    assert isinstance(error, InvalidInput) and error.to_dict()["field"] == "response_format.json_schema"


def walk(compiler: ConstraintCompiler, spec: ConstraintSpec, seed: int, longest: int = 40) -> str:
    """A random text the constraint allows, character by character, as a job would sample it."""
    rng = np.random.default_rng(seed)
    matcher = compiler.matcher(spec)
    text = ""
    while not matcher.complete and len(text) < longest:
        assert not matcher.dead_end, text
        char = int(rng.choice(np.flatnonzero(matcher.allowed)))
        matcher.consume(char)
        matcher.refresh()
        text += compiler.vocab[char]
    assert matcher.complete, text
    return text


@pytest.mark.parametrize(
    ("kind", "source", "check"),
    [
        ("grammar", 'start: "tea" | "café"', lambda t: t in ("tea", "café")),
        ("json", json.dumps({"enum": ["café", "tea"]}), lambda t: json.loads(t) in ("café", "tea")),
        ("json", json.dumps({"const": "é"}), lambda t: json.loads(t) == "é"),
        ("regex", "é+x", lambda t: re.fullmatch("é+x", t) is not None),
        ("regex", "[漢é]{2}", lambda t: re.fullmatch("[漢é]{2}", t) is not None),
        ("choice", json.dumps(["漢字", "é"]), lambda t: t in ("漢字", "é")),
    ],
)
def test_characters_of_several_bytes_are_matched_whole(kind: str, source: str, check: Callable[[str], bool]) -> None:
    """A vocabulary with "é" (2 bytes in UTF-8) and CJK characters (3 bytes): constraints that need them compile,
    and every text they allow is checked with Python."""
    compiler = ConstraintCompiler(list('\n "acefitxé漢字'))
    texts = {walk(compiler, ConstraintSpec(kind, source), seed) for seed in range(12)}
    assert all(check(t) for t in texts), texts

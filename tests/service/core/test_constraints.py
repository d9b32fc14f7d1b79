"""Structured outputs: every sampled text meets its constraint, through the real scheduler and onnxruntime.

Two real models: the tiny Shakespeare LSTM (letters and punctuation) and a tiny LSTM trained here
on JSON lines, whose vocabulary has braces, quotes and digits. Each constraint is checked with
an independent checker (Python's `re`, `json` + `jsonschema`, a bracket counter), never with
llguidance itself.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.constraint_cases import JSON_CASES, SHAKESPEARE_CASES, Case, balanced, json_lines, regex
from service.core.constraints import (
    MASK_BUDGET_S,
    PROBE_GIVE_UP,
    STEP_BUDGET_S,
    Compiled,
    ConstraintCompiler,
    ConstraintError,
    TooCostly,
)
from service.core.engine import Engine
from service.core.events import DoneEvent, ErrorEvent, TextEvent
from service.core.jobs import Job
from service.core.sampling import ConstraintSpec, SamplingParams
from service.core.scheduler import Scheduler
from service.errors import InvalidInput, failure
from service.metrics import Metrics
from tests.utils import tiny_train_config

SAMPLES = 40  # per constraint, all in one batch


@pytest.fixture(scope="module")
def json_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """A tiny LSTM trained by the project's own loop on JSON lines, exported as the service reads it."""
    from training.export import export_many
    from training.train import train

    folder = tmp_path_factory.mktemp("json-model")
    corpus = folder / "json.txt"
    corpus.write_text(json_lines(1500), encoding="utf-8")
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


BRACKETS = """
start: group
group: "(" item* ")" | "[" item* "]"
item: "a" | group
"""
# The shared JSON-model cases, and two that need this model's corpus: its id lines and bracket groups.
TINY_JSON_CASES: list[Case] = [
    *JSON_CASES,
    regex(r'\{"id": [0-9]{1,4}\}'),
    (ConstraintSpec("grammar", BRACKETS), lambda t: balanced(t) and set(t) <= set("()[]a")),
]


def case_id(case: Case) -> str:
    return case[0].source[:30]


@pytest.mark.parametrize(("spec", "check"), SHAKESPEARE_CASES, ids=[case_id(c) for c in SHAKESPEARE_CASES])
def test_every_sample_matches_shakespeare(engine: Engine, spec: ConstraintSpec, check: Callable[[str], bool]) -> None:
    for text, reason in sample(engine, spec.kind, spec.source):
        if reason == "stop":
            assert check(text), (spec.source, text)
        else:  # only the unbounded nesting grammar may run out of characters first
            assert reason == "length" and spec.kind == "grammar" and re.fullmatch("a*", text), (spec.source, text)


@pytest.mark.parametrize(("spec", "check"), TINY_JSON_CASES, ids=[case_id(c) for c in TINY_JSON_CASES])
def test_every_sample_matches_json_model(
    json_engine: Engine, spec: ConstraintSpec, check: Callable[[str], bool]
) -> None:
    results = sample(json_engine, spec.kind, spec.source, max_new=400)
    stopped = [text for text, reason in results if reason == "stop"]
    assert len(stopped) >= len(results) // 2, results
    for text, reason in results:
        if reason == "stop":
            assert check(text), (spec.source, text)


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


class _MeasuredCostly(ConstraintCompiler):
    """A compiler whose probe measures every constraint at `over` times the budget."""

    def __init__(self, vocab: tuple[str, ...], over: float) -> None:
        super().__init__(vocab)
        self.over = over
        self.compiles = 0

    def _compile(self, spec: ConstraintSpec) -> Compiled:
        self.compiles += 1
        raise TooCostly(self.over * self.mask_budget_s, self.mask_budget_s)


@pytest.mark.parametrize(("over", "kept"), [(2.0, False), (PROBE_GIVE_UP * 2.0, True)])
def test_only_a_verdict_far_over_the_budget_is_cached(engine: Engine, over: float, kept: bool) -> None:
    """A mask measured near the budget could measure under it next time: it is refused, not cached."""
    compiler = _MeasuredCostly(engine.info.vocab, over)
    for _ in range(2):
        with pytest.raises(TooCostly, match="too costly to follow"):
            compiler.matcher(ConstraintSpec("regex", "[a-z]{3}"))
    assert compiler.cached == (1 if kept else 0)
    assert compiler.compiles == (1 if kept else 2)


def test_json_is_compact_unless_the_schema_asks_for_whitespace() -> None:
    """Every text a JSON Schema allows is compact (random walks over the mask, with spaces and line
    breaks in the vocabulary); a schema's own x-guidance can still allow whitespace."""
    compiler = ConstraintCompiler(list('\n {}[]":,0123456789abcdefghijklmnopqrstuvwxyz'))
    numbers = {"type": "array", "items": {"type": "integer", "maximum": 999}, "maxItems": 3}
    schema = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 99}, "b": numbers}}
    schema |= {"required": ["a", "b"], "additionalProperties": False}
    compact = {walk(compiler, ConstraintSpec("json", json.dumps(schema)), seed, longest=200) for seed in range(20)}
    assert all(" " not in t and "\n" not in t and isinstance(json.loads(t)["a"], int) for t in compact), compact
    spaced = schema | {"x-guidance": {"whitespace_flexible": True}}
    for flexible, allowed in ((spaced, True), (schema, False)):
        matcher = compiler.matcher(ConstraintSpec("json", json.dumps(flexible)))
        matcher.consume(compiler.vocab.index("{"))
        matcher.refresh()
        assert bool(matcher.allowed[compiler.vocab.index(" ")]) is allowed  # a space after the brace

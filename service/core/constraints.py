"""Structured outputs: a constraint compiled to a mask over the next character, with llguidance.

A character vocabulary makes a constraint exact: each character is one "token" whose bytes are
its UTF-8 encoding, plus one synthetic end token that the constraint allows once the text is
complete. `ConstraintCompiler` compiles a `ConstraintSpec` (regex, choice, JSON Schema or Lark
grammar) once per model and keeps the compiled matcher in an LRU cache; each job gets a copy, a
`CharMatcher`, that says which characters may come next and consumes the one sampled.

Compiling is bounded: llguidance's parser limits cap the lexer's work and size (a pathological
pattern fails with its message), and a probe walks a few characters to measure the cost of a
mask: a constraint whose mask takes longer than `MASK_BUDGET_S` would slow every stream in the
batch, and is refused (the probe stops at the first mask far over it). The measured cost stays
with the compiled constraint, so that a request running it on many rows at once can be held to
`STEP_BUDGET_S` (`Compiled.check_rows`). A constraint that allows no first character, or only the
empty text, is refused too. Refusals are cached like compiled constraints, so a bad one costs its
compile once, and a compile in flight is shared by every request that asks for the same one.

Costs are measured in the probing thread's CPU time, not by the wall clock, so a thread that the
OS stalls or a busy neighbour does not make a cheap constraint look costly. A "too costly"
verdict is cached only when the mask was far over the budget (PROBE_GIVE_UP times): one nearer
the budget is a measurement that could go the other way next time, so it is measured again.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llguidance
import numpy as np
from llguidance._tokenizer import TokenizerWrapper

from service.core.sampling import ConstraintSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

KINDS = ("regex", "choice", "json", "grammar")
# JSON Schema output is compact unless the schema's own x-guidance asks otherwise: free whitespace
# between tokens lets a model that is no JSON expert write spaces and newlines until its length
# runs out, where a compact object has to move on to the next key or value.
JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False}
COMPILED_KEPT = 256  # compiled constraints kept per model (each a few kB to a few MB of lexer states)
# llguidance's own limits, lowered for a server that compiles what clients send: the lexer's
# fuel bounds the time spent building a regex and its states bound the memory (the constraints
# docs give what they cost on the project's machine).
LIMITS = dict(
    initial_lexer_fuel=1_000_000,
    step_lexer_fuel=200_000,
    max_lexer_states=20_000,
    max_grammar_size=50_000,
    verbose_errors=False,  # the message goes to the client: no parser dump
)
# Probes of this many walks of this many characters after compiling.
PROBE_CHARS = 16
PROBE_WALKS = 8
# A character's mask may take this long (the probe's median), per row: an ordinary regex or JSON
# Schema's mask is tens of times cheaper, while a pathological one (a{15000}) on 64 rows would add
# more to every step of every stream of the model than the step itself costs.
MASK_BUDGET_S = 0.0005
# The probe stops at the first mask this many times over the budget: a{100000} is refused after
# one mask rather than after all of them.
PROBE_GIVE_UP = 20
# What one request's constrained rows together may add to a step (rows x the mask's cost): each
# step waits for every row's mask, so a request with n choices makes every stream of the model wait.
STEP_BUDGET_S = 0.004


class ConstraintError(Exception):
    """The constraint does not compile, or no text of this vocabulary can meet it."""


class _CharTokens:
    """The character vocabulary as llguidance's TokenizerWrapper reads it: one token per character."""

    def __init__(self, vocab: Sequence[str]) -> None:
        self.tokens = [c.encode("utf-8") for c in vocab] + [b"<end>"]
        self.eos_token_id = len(vocab)
        self.bos_token_id = None
        self.special_token_ids = [len(vocab)]
        self._index = {c.encode("utf-8"): i for i, c in enumerate(vocab)}
        self._longest = max((len(t) for t in self._index), default=1)

    def __call__(self, text: bytes) -> list[int]:
        """Ids by longest match over the characters' UTF-8 bytes (a character such as "é" is 2 bytes, "漢" 3).

        llguidance tokenizes only to read literal text; a byte no character starts with has no id."""
        ids: list[int] = []
        at = 0
        while at < len(text):
            for size in range(min(self._longest, len(text) - at), 0, -1):
                found = self._index.get(text[at : at + size])
                if found is not None:
                    ids.append(found)
                    at += size
                    break
            else:
                at += 1
        return ids


def grammar_of(spec: ConstraintSpec) -> str:
    """llguidance's grammar text for a spec; raises ConstraintError with the compiler's message."""
    try:
        if spec.kind == "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(spec.source))
        if spec.kind == "choice":
            return str(llguidance.grammar_from("choice", spec.source))
        if spec.kind == "json":
            return str(llguidance.LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_DEFAULTS))
        if spec.kind == "grammar":
            return str(llguidance.LLMatcher.grammar_from_lark(spec.source))
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise ConstraintError(str(exc)) from exc
    raise ConstraintError(f"unknown kind {spec.kind!r}; one of {', '.join(KINDS)}")


class CharMatcher:
    """One job's constraint: which characters may come next (`allowed`), whether the text is complete
    (it matches and nothing may follow) or at a dead end (nothing may follow and it does not match)."""

    __slots__ = ("allowed", "complete", "dead_end", "matcher")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.allowed = np.zeros(vocab_size, bool)  # (vocab,) characters the next step may sample
        self.complete = False
        self.dead_end = False
        self.refresh()

    def refresh(self) -> None:
        """Work out the next mask (after a character was consumed)."""
        bits = np.zeros((1, _words(self.allowed.shape[0])), np.int32)
        self.matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        self._read(_unpack(bits, self.allowed.shape[0])[0])

    def _read(self, allowed: np.ndarray) -> None:
        self.allowed = allowed
        if allowed.any() and not self.matcher.is_error():
            self.complete = self.dead_end = False
        else:  # rare: only at the end of a text, or a dead end
            accepting = self.matcher.is_accepting() and not self.matcher.is_error()
            self.complete, self.dead_end = accepting, not accepting

    def consume(self, char: int) -> None:
        self.matcher.consume_token(char)


def _words(vocab_size: int) -> int:
    return (vocab_size + 1 + 31) // 32  # the characters and the end token, 32 to a word


def _unpack(bits: np.ndarray, vocab_size: int) -> np.ndarray:
    """(rows, words) llguidance bitmasks -> (rows, vocab) booleans (the end token's bit dropped)."""
    return np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size].astype(bool)


def advance_all(matchers: list[CharMatcher], chars: list[int]) -> np.ndarray:
    """Consume each matcher's sampled character and work out its next mask, written into one array and
    unpacked at once; the masks, (rows, vocab).

    One thread: 64 rows of a regex take ~0.23 ms here, less than through llguidance's parallel
    executor (~0.34 ms), whose hand-over costs more than a 65-character mask."""
    if not matchers:
        return np.zeros((0, 0), bool)
    vocab = matchers[0].allowed.shape[0]
    words = _words(vocab)
    bits = np.zeros((len(matchers), words), np.int32)
    for i, (m, c) in enumerate(zip(matchers, chars, strict=True)):
        m.matcher.consume_token(c)
        m.matcher.unsafe_compute_mask_ptr(bits[i].ctypes.data, words * 4)
    allowed = _unpack(bits, vocab)
    some = np.asarray(allowed.any(axis=1))
    for i, m in enumerate(matchers):
        if some[i]:
            m.allowed, m.complete, m.dead_end = allowed[i], False, False
        else:
            m._read(allowed[i])
    return allowed


@dataclass(frozen=True, slots=True)
class Compiled:
    """A compiled constraint and what following it costs; `new()` gives each job its own copy."""

    matcher: llguidance.LLMatcher
    vocab_size: int
    mask_s: float  # one character's mask, per row (the probe's median)

    def new(self) -> CharMatcher:
        return CharMatcher(self.matcher.deep_copy(), self.vocab_size)

    def check_rows(self, rows: int, budget_s: float = STEP_BUDGET_S) -> None:
        """Raise ConstraintError when `rows` rows of this constraint would add more than `budget_s` to a step."""
        if rows * self.mask_s > budget_s:
            fits = max(int(budget_s / self.mask_s), 1)
            raise ConstraintError(
                f"too costly for {rows} rows at once: a character's mask takes {self.mask_s * 1e6:.0f} us, "
                f"{rows * self.mask_s * 1000:.1f} ms a step for all of them (the limit is {budget_s * 1000:.0f} ms); "
                f"ask for at most {fits} at once, or simplify it"
            )


class ConstraintCompiler:
    """One model's compiled constraints: an LRU cache of matchers, each copied for a job.

    Thread-safe; `submit` compiles on an executor and shares a compile in flight."""

    def __init__(self, vocab: Sequence[str], kept: int = COMPILED_KEPT, mask_budget_s: float = MASK_BUDGET_S) -> None:
        self.vocab = tuple(vocab)
        self.tokenizer = llguidance.LLTokenizer(TokenizerWrapper(_CharTokens(self.vocab)))
        self.limits = llguidance.LLParserLimits(**LIMITS)  # type: ignore[arg-type]
        self.mask_budget_s = mask_budget_s
        self._kept = kept
        self._compiled: OrderedDict[ConstraintSpec, Compiled | ConstraintError] = OrderedDict()
        self._running: dict[ConstraintSpec, Future[Compiled]] = {}
        self._lock = threading.Lock()

    def matcher(self, spec: ConstraintSpec) -> CharMatcher:
        """A fresh matcher for one job; raises ConstraintError (with the compiler's message) before any step.

        Compiles in this thread when nobody else is compiling it."""
        return self.submit(spec).result().new()

    def submit(self, spec: ConstraintSpec, executor: Executor | None = None) -> Future[Compiled]:
        """The compiled constraint, from the cache, from a compile in flight, or compiled on `executor`
        (in this thread when None); a refusal is the future's ConstraintError."""
        key = ConstraintSpec(spec.kind, spec.source)
        with self._lock:
            found = self._compiled.get(key)
            if found is not None:
                self._compiled.move_to_end(key)
                return _settled(found)
            running = self._running.get(key)
            if running is not None:
                return running
            future: Future[Compiled] = Future()
            future.set_running_or_notify_cancel()  # shared by several requests: none of them may cancel it
            self._running[key] = future
        if executor is None:
            self._settle(key, future)
        else:
            executor.submit(self._settle, key, future)
        return future

    def _settle(self, key: ConstraintSpec, future: Future[Compiled]) -> None:
        try:
            found: Compiled | ConstraintError = self._compile(key)
        except TooCostly as exc:
            if not exc.certain:  # a measurement near the budget: the next request measures again
                with self._lock:
                    del self._running[key]
                future.set_exception(exc)
                return
            found = exc
        except ConstraintError as exc:
            found = exc
        except BaseException as exc:  # not a verdict on the constraint: not cached
            with self._lock:
                del self._running[key]
            future.set_exception(exc)
            raise
        with self._lock:
            self._compiled[key] = found
            while len(self._compiled) > self._kept:
                self._compiled.popitem(last=False)
            del self._running[key]
        _settle_with(future, found)

    @property
    def cached(self) -> int:
        return len(self._compiled)

    def _compile(self, spec: ConstraintSpec) -> Compiled:
        grammar = grammar_of(spec)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        if matcher.is_error():
            raise ConstraintError(_message(matcher.get_error()))
        t0 = time.thread_time()
        first = CharMatcher(matcher.deep_copy(), len(self.vocab))
        first_s = time.thread_time() - t0
        if first.matcher.is_error():  # a limit hit, or no character can start a match
            error = _message(first.matcher.get_error())
            if "NoExtension" in error:
                error = f"no text of this model's characters can match it (the vocabulary lacks a character: {error})"
            raise ConstraintError(error)
        if not first.allowed.any():
            if first.matcher.is_accepting():
                raise ConstraintError("it matches only the empty text: there is nothing to generate")
            raise ConstraintError(
                "no text made of this model's characters can match it (the vocabulary lacks a character it needs)"
            )
        return Compiled(matcher, len(self.vocab), _probe(first, self.vocab, self.mask_budget_s, first_s))


def _settled(found: Compiled | ConstraintError) -> Future[Compiled]:
    future: Future[Compiled] = Future()
    future.set_running_or_notify_cancel()
    _settle_with(future, found)
    return future


def _settle_with(future: Future[Compiled], found: Compiled | ConstraintError) -> None:
    if isinstance(found, ConstraintError):
        future.set_exception(found)
    else:
        future.set_result(found)


class TooCostly(ConstraintError):
    """A constraint whose masks take longer than the budget; `certain` when far over it."""

    def __init__(self, mask_s: float, budget_s: float) -> None:
        super().__init__(
            f"too costly to follow: a character's mask takes {mask_s * 1000:.2f} ms (the limit is "
            f"{budget_s * 1000:.2f} ms); bound its repetitions"
        )
        self.certain = mask_s > PROBE_GIVE_UP * budget_s


def _too_costly(mask_s: float, budget_s: float) -> ConstraintError:
    return TooCostly(mask_s, budget_s)


def _probe(first: CharMatcher, vocab: tuple[str, ...], budget_s: float, first_s: float) -> float:
    """Walk a few short random paths (fixed seed) through the constraint: refuse it when a path reaches a
    character the vocabulary lacks, or when its masks are too slow to follow; the median mask time.

    Times are this thread's CPU time, and their median is compared, so that neither a stall nor one
    slow step refuses a constraint that is cheap to follow; one mask PROBE_GIVE_UP times over the budget ends
    the probe at once, so that a costly constraint holds its thread for one mask, not a hundred.
    Walks find most dead ends, not all: a generation that reaches one anyway ends with an error."""
    if first_s > PROBE_GIVE_UP * budget_s:
        raise _too_costly(first_s, budget_s)
    rng = np.random.default_rng(0)
    took: list[float] = []
    for _ in range(PROBE_WALKS):
        walker = CharMatcher(first.matcher.deep_copy(), len(vocab))
        text = ""
        for _ in range(PROBE_CHARS):
            allowed = np.flatnonzero(walker.allowed)
            if not allowed.size:
                break
            char = int(rng.choice(allowed))
            walker.consume(char)
            text += vocab[char]
            t0 = time.thread_time()
            walker.refresh()
            took.append(time.thread_time() - t0)
            if took[-1] > PROBE_GIVE_UP * budget_s:
                raise _too_costly(took[-1], budget_s)
            if walker.dead_end:
                why = _message(walker.matcher.get_error()) if walker.matcher.is_error() else "no continuation"
                raise ConstraintError(
                    f"no text of this model's characters can match it: after {text[-40:]!r} the vocabulary lacks "
                    f"a character it needs ({why})"
                )
    typical = float(np.median(took)) if took else first_s
    if typical > budget_s:
        raise _too_costly(typical, budget_s)
    return typical


def _message(error: str) -> str:
    """llguidance's message without its debugging suffix."""
    return error.replace("<non-verbose/>", "").strip()
